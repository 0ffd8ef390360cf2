"""Where a model's learned special-token table lives, and the tiny table written with tiny checkpoints.

The table (reference ``example/assets/special_tokens.npz``: ``caption_token (1, D)``,
``logo_token (1, D)``, ``other_tokens (100, D)`` float64) belongs to the model: it is read
from ``ModelConfig.special_tokens.table``, a path relative to the DiT checkpoint folder
unless absolute (default ``<dit folder>/special_tokens.npz``). Tiny checkpoints get a random
table of the same layout (:func:`write_tiny_special_tokens`), so the CPU models exercise the
same code path as the real ones. Parsing and prepending: :mod:`stages.text_encoder.special_tokens`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.config import ModelConfig
from stages.dit.checkpoint import resolve_checkpoint

if TYPE_CHECKING:  # importing the text-encoder package pulls in transformers: only when a table is loaded
    from stages.text_encoder.special_tokens import SpecialTokenTable

TABLE_FILE = "special_tokens.npz"
NUM_OTHER_TOKENS = 100


def write_tiny_special_tokens(path: Path, dim: int, seed: int = 0) -> None:
    """Write a random special-token table in the reference layout: every row N(0, 0.5^2) from
    ``np.random.default_rng(seed)`` (like the golden ``tiny_special_tokens.npz``), float64,
    arrays drawn in the order caption_token, logo_token, other_tokens.

    Raises:
        ValueError: ``dim < 1``.
    """
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    rng = np.random.default_rng(seed)
    arrays = {
        "caption_token": rng.normal(0.0, 0.5, (1, dim)),
        "logo_token": rng.normal(0.0, 0.5, (1, dim)),
        "other_tokens": rng.normal(0.0, 0.5, (NUM_OTHER_TOKENS, dim)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz" to the name
        np.savez(f, **arrays)


def table_path(cfg: ModelConfig, dit_dir: Path) -> Path:
    """``cfg.special_tokens.table`` resolved against the DiT checkpoint location ``dit_dir``.

    A relative path is looked up in ``dit_dir`` (the folder of a single-file checkpoint), then in
    the reference variant folder that :func:`stages.dit.checkpoint.resolve_checkpoint` picks for
    ``cfg`` (``inference_weight[.fp8][.distill]``); the first that exists wins, else the first.
    """
    table = Path(cfg.special_tokens.table)
    if table.is_absolute():
        return table
    base = Path(dit_dir)
    base = base.parent if base.is_file() else base
    candidates = [base / table]
    try:
        resolved = resolve_checkpoint(base, fp8_quant=cfg.dit.fp8_quant, distill=cfg.sampling.distill)
        candidates.append((resolved.parent if resolved.is_file() else resolved) / table)
    except FileNotFoundError:
        pass
    return next((c for c in candidates if c.is_file()), candidates[0])


def load_special_tokens(cfg: ModelConfig, dit_dir: Path) -> "SpecialTokenTable | None":
    """The model's special-token table, or None when ``cfg.special_tokens`` prepends nothing.

    Raises:
        FileNotFoundError: the table is needed but absent (names the path and the config field).
        ValueError: the table's width differs from ``cfg.dit.caption_channels``, or it is malformed.
    """
    if not cfg.special_tokens.enabled:
        return None
    path = table_path(cfg, dit_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"special-token table {path} not found (special_tokens.table of model {cfg.name!r}; the reference "
            f"ships it as example/assets/special_tokens.npz)"
        )
    from stages.text_encoder.special_tokens import SpecialTokenTable  # noqa: PLC0415

    try:
        table = SpecialTokenTable.load(path)
    except KeyError as err:
        raise ValueError(f"special-token table {path}: missing array {err}") from None
    if table.dim != cfg.dit.caption_channels:
        raise ValueError(f"special-token table {path} has width {table.dim}, caption_channels is {cfg.dit.caption_channels}")
    return table
