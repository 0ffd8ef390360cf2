"""Reading the layout of a DiT checkpoint in the official MAGI-1 layout (no tensor data is read).

Official layout (reference ``load_sharded_safetensors_parallel_with_progress`` and
``load_state_dict``): a folder with ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {key: shard file}}``) and its shards, or a folder with one
``model.safetensors``; a downloaded model root holds the variant folders
``inference_weight`` (base), ``inference_weight.distill`` and ``inference_weight.fp8.distill``
(the reference appends ``.fp8`` for ``fp8_quant`` and then ``.distill`` for ``distill``). We
also accept a single ``.safetensors`` file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP8_DTYPE_NAMES = ("F8_E4M3",)  # safetensors name of torch.float8_e4m3fn


class CheckpointMismatch(ValueError):
    """The checkpoint's keys/shapes differ from the model's; the message names every offending key."""


def variant_dir_name(*, fp8_quant: bool, distill: bool) -> str:
    """Reference ``load_state_dict`` sub-folder: ``inference_weight[.fp8][.distill]``."""
    return "inference_weight" + (".fp8" if fp8_quant else "") + (".distill" if distill else "")


def resolve_checkpoint(path: Path, *, fp8_quant: bool = False, distill: bool = False) -> Path:
    """The folder (or file) holding the weights: ``path`` itself when it is a file or holds an
    index / ``model.safetensors``, else its reference variant sub-folder when that exists.

    Raises:
        FileNotFoundError: neither (the message names what was looked for).
    """
    path = Path(path)
    if path.is_file() or (path / INDEX_NAME).exists() or (path / SINGLE_NAME).exists():
        return path
    variant = path / variant_dir_name(fp8_quant=fp8_quant, distill=distill)
    if variant.is_dir() and ((variant / INDEX_NAME).exists() or (variant / SINGLE_NAME).exists()):
        return variant
    raise FileNotFoundError(
        f"no DiT checkpoint at {path}: expected {INDEX_NAME}, {SINGLE_NAME}, a .safetensors file "
        f"or the variant folder {variant.name}/"
    )


def read_index(path: Path) -> dict[str, str]:
    """``weight_map`` of ``path/model.safetensors.index.json``.

    Raises:
        CheckpointMismatch: unreadable JSON or no ``weight_map`` object of key -> shard file name.
    """
    index = Path(path) / INDEX_NAME
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointMismatch(f"bad index {index}: {type(err).__name__}: {err}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointMismatch(f"bad index {index}: weight_map must map tensor keys to shard file names")
    return weight_map


def checkpoint_files(path: Path) -> dict[str, list[str]]:
    """Map shard file -> its tensor keys for a checkpoint folder or a single file.

    Raises:
        FileNotFoundError: no index, no ``model.safetensors`` and not a .safetensors file,
            or a shard named in the index is absent.
        CheckpointMismatch: a malformed index.
    """
    path = Path(path)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            return {str(path): list(f.keys())}
    if (path / INDEX_NAME).exists():
        shards: dict[str, list[str]] = defaultdict(list)
        for key, shard in read_index(path).items():
            shards[str(path / shard)].append(key)
        for shard in shards:
            if not Path(shard).exists():
                raise FileNotFoundError(f"shard {shard} named in {path / INDEX_NAME} is missing")
        return dict(shards)
    if (path / SINGLE_NAME).exists():
        return checkpoint_files(path / SINGLE_NAME)
    raise FileNotFoundError(f"no DiT checkpoint at {path}: expected {INDEX_NAME}, {SINGLE_NAME} or a .safetensors file")


def read_layout(files: dict[str, list[str]]) -> tuple[dict[str, tuple[tuple[int, ...], str]], list[str]]:
    """Shapes and safetensors dtype names of the listed keys, read from the shard headers only.

    Returns:
        ``({key: (shape, dtype name e.g. "BF16")}, problems)``; problems name a shard that
        cannot be read or a key the index puts in a shard that does not hold it.
    """
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    problems: list[str] = []
    for shard, keys in files.items():
        try:
            with safe_open(shard, "pt") as f:
                held = set(f.keys())
                for key in keys:
                    if key not in held:
                        problems.append(f"bad index: key {key} is not in shard {Path(shard).name}")
                        continue
                    sl = f.get_slice(key)
                    found[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as err:  # noqa: BLE001 - a corrupt shard is reported, not raised
            problems.append(f"unreadable shard {Path(shard).name}: {err}")
    return found, problems


def compare_layout(found: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, tuple[tuple[int, ...], bool]]) -> dict[str, list[str]]:
    """Compare a checkpoint layout with the model's.

    Args:
        found: :func:`read_layout` output.
        expected: key -> (shape, is_fp8) of the model.

    Returns:
        ``{"missing": [...], "unexpected": [...], "wrong shapes": [...], "wrong dtypes": [...]}``
        (each sorted; a shape / dtype entry reads ``"key (expected X, got Y)"``). A dtype is
        wrong when an fp8 weight is stored as non-fp8 or vice versa; other float dtypes are
        cast at load.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = sorted(set(found) & set(expected))
    shapes = [f"{k} (expected {list(expected[k][0])}, got {list(found[k][0])})"
              for k in common if tuple(expected[k][0]) != found[k][0]]
    dtypes = [f"{k} (expected {'F8_E4M3' if expected[k][1] else 'a non-fp8 dtype'}, got {found[k][1]})"
              for k in common if expected[k][1] != (found[k][1] in FP8_DTYPE_NAMES)]
    return {"missing": missing, "unexpected": unexpected, "wrong shapes": shapes, "wrong dtypes": dtypes}
