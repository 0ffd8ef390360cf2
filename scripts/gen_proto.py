#!/usr/bin/env python3
"""Regenerate the Python modules of the public API from ``proto/magi/v1/*.proto``.

Usage (from the repository root)::

    python scripts/gen_proto.py            # rewrite proto/magi/v1/*_pb2*.py[i] in place
    python scripts/gen_proto.py --out DIR  # write them under DIR/magi/v1/ instead

Uses ``grpc_tools.protoc`` (grpcio-tools, pinned in pyproject.toml), so the output
depends only on that version. ``tests/unit/test_proto_generated.py`` runs this
script into a temporary folder and fails when the committed modules are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def proto_files() -> list[Path]:
    """The .proto sources, relative to ``proto/`` (their import root)."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / "magi").rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto; returns the generated files under ``out_root``.

    Raises:
        RuntimeError: protoc failed (its exit status is in the message).
    """
    from grpc_tools import protoc  # noqa: PLC0415  (build-time tool only)

    out_root.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in proto_files()),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc exited with status {status}")
    return sorted(p for p in out_root.rglob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: proto/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
