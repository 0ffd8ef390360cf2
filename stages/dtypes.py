"""The one map from the config tree's dtype names to torch dtypes."""

from __future__ import annotations

import torch

from stages.config import DTypeName

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: DTypeName | str) -> torch.dtype:
    """``torch.float32`` / ``torch.bfloat16`` / ``torch.float16`` for a config dtype name.

    Raises:
        ValueError: ``name`` is not one of ``float32``, ``bfloat16``, ``float16``.
    """
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
