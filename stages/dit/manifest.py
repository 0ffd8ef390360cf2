"""DiT checkpoint manifests and the pre-deployment checkpoint check (``magi checkpoint ...``).

* :func:`expected_manifest`: the state_dict layout (key, shape, dtype) our DiT has for a
  configuration, from a model built on the meta device (no memory); equals the reference
  ``VideoDiTModel`` layout (``shared/golden/dit_manifest_*.json``) key for key, fp8 layouts included.
* :func:`verify_checkpoint`: every problem of a checkpoint folder against a configuration
  (bad index, missing shard, missing / unexpected key, wrong shape, fp8-ness), each naming
  what is wrong, without loading any tensor data.
* :func:`main_verify` / :func:`main_manifest`: entry points for the CLI (print, return an exit
  code); ``python -m stages.dit.manifest {verify PATH,manifest} --config NAME`` runs them too.
  ``NAME`` is a preset name (:data:`stages.config.PRESETS`) or a reference ``config.json``
  (read by :mod:`stages.config_compat`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from stages.config import DiTConfig, ModelConfig, load_preset
from stages.dit.checkpoint import (
    INDEX_NAME, CheckpointMismatch, compare_layout, read_index, read_layout, resolve_checkpoint,
)
from stages.dit.fp8 import FP8
from stages.dit.model import MagiDiT
from stages.dit.token_table import table_path


class ManifestEntry(NamedTuple):
    """One state_dict tensor: ``key``, ``shape`` (tuple of ints), ``dtype`` (torch dtype)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def expected_manifest(cfg: DiTConfig, *, promoted: bool = False) -> list[ManifestEntry]:
    """The DiT state_dict layout for ``cfg`` in state_dict order.

    Args:
        cfg: architecture (``fp8_quant`` selects the fp8 layout).
        promoted: dtypes after the reference ``_high_precision_promoter`` (q/k norms,
            post-norms and final norm in float32) instead of as constructed.
    """
    with torch.device("meta"):
        model = MagiDiT(cfg)
    if promoted:
        model.promote_high_precision()
    return [ManifestEntry(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


def _files(path: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Shard -> keys (like :func:`stages.dit.checkpoint.checkpoint_files`) plus problems instead of raising."""
    if path.is_file():
        return {str(path): None}, []
    if not (path / INDEX_NAME).exists():
        return {str(path / "model.safetensors"): None}, []
    try:
        weight_map = read_index(path)
    except CheckpointMismatch as err:
        return {}, [str(err)]
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(str(path / shard), []).append(key)
    problems = [f"missing shard: {Path(s).name} (named in {INDEX_NAME} for {len(k)} keys)"
                for s, k in shards.items() if not Path(s).exists()]
    return {s: k for s, k in shards.items() if Path(s).exists()}, problems


def _shard_keys(files: dict[str, list[str] | None]) -> dict[str, list[str]]:
    """Fill in the key lists of single-file checkpoints (``None``) from their headers."""
    from safetensors import safe_open  # noqa: PLC0415

    out = {}
    for shard, keys in files.items():
        if keys is None:
            with safe_open(shard, "pt") as f:
                keys = list(f.keys())
        out[shard] = keys
    return out


def verify_checkpoint(path: Path, cfg: DiTConfig, *, distill: bool = False) -> list[str]:
    """Every problem of the DiT checkpoint at ``path`` for ``cfg`` (empty list = loadable).

    Reads shard headers only. Problems read ``"missing key: K"``, ``"unexpected key: K"``,
    ``"wrong shape: K (expected [..], got [..])"``, ``"wrong dtype: K (expected F8_E4M3, got BF16)"``,
    ``"bad index ..."``, ``"missing shard: F ..."``, ``"unreadable shard: F ..."``, or
    ``"no checkpoint ..."``.

    Args:
        path: checkpoint folder, model root with the reference variant folders, or a .safetensors file.
        cfg: architecture; ``distill`` picks the distill variant folder of a model root.
    """
    try:
        path = resolve_checkpoint(Path(path), fp8_quant=cfg.fp8_quant, distill=distill)
    except FileNotFoundError as err:
        return [f"no checkpoint: {err}"]
    files, problems = _files(path)
    try:
        files = _shard_keys(files)
    except Exception as err:  # noqa: BLE001 - a corrupt single file is a problem to report
        return problems + [f"unreadable shard: {err}"]
    found, read_problems = read_layout(files)
    expected = {e.key: (e.shape, e.dtype == FP8) for e in expected_manifest(cfg)}
    diff = compare_layout(found, expected)
    if problems:  # keys of a missing shard are reported with the shard, not one by one
        listed = {k for keys in files.values() for k in keys}
        diff["missing"] = [k for k in diff["missing"] if k in listed]
    problems += read_problems
    problems += [f"missing key: {k}" for k in diff["missing"]]
    problems += [f"unexpected key: {k}" for k in diff["unexpected"]]
    problems += [f"wrong shape: {k}" for k in diff["wrong shapes"]]
    problems += [f"wrong dtype: {k}" for k in diff["wrong dtypes"]]
    return problems


def verify_model_checkpoint(path: Path, cfg: ModelConfig) -> list[str]:
    """:func:`verify_checkpoint` for ``cfg.dit`` (distill from ``cfg.sampling``) plus the
    special-token table when ``cfg.special_tokens`` needs one."""
    problems = verify_checkpoint(path, cfg.dit, distill=cfg.sampling.distill)
    if cfg.special_tokens.enabled:
        table = table_path(cfg, Path(path))
        if not table.is_file():
            problems.append(f"missing special-token table: {table} (special_tokens.table)")
    return problems


def resolve_config(config: str) -> ModelConfig:
    """A preset name, or the path of a reference ``config.json``.

    Raises:
        KeyError: neither a preset nor an existing file; ReferenceConfigError: a bad reference file.
    """
    if Path(config).is_file():
        from stages.config_compat import read_reference_config  # noqa: PLC0415

        return read_reference_config(Path(config)).model
    return load_preset(config)


def main_verify(path: str | Path, config_name: str) -> int:
    """``magi checkpoint verify PATH --config NAME``: print the verdict; 0 = OK, 1 = problems, 2 = bad config."""
    try:
        cfg = resolve_config(config_name)
    except (KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = verify_model_checkpoint(Path(path), cfg)
    if problems:
        print(f"FAILED: {path} does not match {cfg.name} ({len(problems)} problems)")
        for p in problems:
            print(f"  {p}")
        return 1
    entries = expected_manifest(cfg.dit)
    print(f"OK: {path} matches {cfg.name} ({len(entries)} tensors, {sum(_numel(e.shape) for e in entries)} elements)")
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main_manifest(config_name: str, *, as_json: bool = False) -> int:
    """``magi checkpoint manifest --config NAME``: print ``key shape dtype`` per tensor (or JSON); 0 or 2."""
    try:
        cfg = resolve_config(config_name)
    except (KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    entries = expected_manifest(cfg.dit)
    if as_json:
        rows = [{"key": e.key, "shape": list(e.shape), "dtype": str(e.dtype)} for e in entries]
        print(json.dumps({"config": cfg.name, "num_tensors": len(rows), "state_dict": rows}, indent=1))
        return 0
    for e in entries:
        print(f"{e.key}\t{list(e.shape)}\t{str(e.dtype).replace('torch.', '')}")
    print(f"# {cfg.name}: {len(entries)} tensors, {sum(_numel(e.shape) for e in entries)} elements")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.dit.manifest verify PATH --config NAME`` | ``manifest --config NAME [--json]``."""
    parser = argparse.ArgumentParser(prog="python -m stages.dit.manifest")
    sub = parser.add_subparsers(dest="cmd", required=True)
    verify = sub.add_parser("verify", help="check a DiT checkpoint folder against a model configuration")
    verify.add_argument("path")
    verify.add_argument("--config", required=True)
    manifest = sub.add_parser("manifest", help="print the expected DiT state_dict layout")
    manifest.add_argument("--config", required=True)
    manifest.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "verify":
        return main_verify(args.path, args.config)
    return main_manifest(args.config, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
