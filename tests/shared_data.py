"""Where the tests find ``../shared`` (golden reference outputs and real inputs): one place.

``$MAGI_GOLDEN_DIR`` / ``$MAGI_INPUTS_DIR`` override the folders; by default they are
``<repo>/../shared/golden`` and ``<repo>/../shared/inputs``. With ``MAGI_REQUIRE_GOLDEN=1``
(set by .ci/run) a missing folder fails the tests that need it instead of skipping them.
Use the ``golden_dir`` / ``inputs_dir`` fixtures of tests/conftest.py in tests; the functions
here serve collection-time needs (parametrizing over the cases a JSON file lists).
"""

from __future__ import annotations

import json
import os
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def golden_dir() -> Path:
    """The golden folder (may not exist)."""
    return Path(os.environ.get("MAGI_GOLDEN_DIR", SHARED / "golden"))


def inputs_dir() -> Path:
    """The real-inputs folder (may not exist)."""
    return Path(os.environ.get("MAGI_INPUTS_DIR", SHARED / "inputs"))


def required() -> bool:
    return os.environ.get("MAGI_REQUIRE_GOLDEN", "") not in ("", "0")


def need(path: Path, what: str) -> Path:
    """``path`` if it exists; else skip the calling test (fail under MAGI_REQUIRE_GOLDEN=1)."""
    if path.exists():
        return path
    message = f"{what} not found at {path} (set MAGI_GOLDEN_DIR / MAGI_INPUTS_DIR)"
    if required():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


MISSING = "no-golden-data"  # the one parameter of a golden test when its JSON file is absent


def golden_json(name: str) -> dict | None:
    """``golden_dir() / name`` parsed, or None when absent (collection time; tests use fixtures)."""
    path = golden_dir() / name
    return json.loads(path.read_text()) if path.exists() else None


def golden_params(name: str, key: str = "cases", where=None) -> list:
    """Names of the entries of ``golden_json(name)[key]`` (in file order) for which
    ``where(entry)`` holds, to parametrize a test over; ``[MISSING]`` when the file is absent,
    so that the test runs once and its ``golden_dir`` fixture skips it (fails under
    MAGI_REQUIRE_GOLDEN=1)."""
    data = golden_json(name)
    if data is None:
        return [MISSING]
    return [n for n, entry in data[key].items() if where is None or where(entry)]


def golden_file(name: str) -> Path:
    """``golden_dir() / name``; skips (fails under MAGI_REQUIRE_GOLDEN=1) when absent."""
    return need(golden_dir() / name, f"golden file {name}")


def skip_unless(path: Path, what: str):
    """Marker for tests that need ``path``: skip when absent, except under MAGI_REQUIRE_GOLDEN=1
    (the test then runs and fails)."""
    return pytest.mark.skipif(not path.exists() and not required(), reason=f"{what} not found at {path}")


def run_config_name(case: str, tiny_configs: dict) -> str:
    """Run config (``tiny_dit_config.json`` ``run_configs``) the harness used for golden ``case``,
    read from the file's ``run_configs_note`` map (``a/b* -> x; c/d -> y/z``: globs allowed, pairs
    matched by position when both sides have as many names; an exact name wins over a glob).

    Raises:
        KeyError: the note maps no pattern onto ``case``.
    """
    found = {}
    for lhs, rhs in re.findall(r"([\w*]+(?:/[\w*]+)*) -> (\w+(?:/\w+)*)", tiny_configs["run_configs_note"]):
        names, runs = lhs.split("/"), rhs.split("/")
        for i, pattern in enumerate(names):
            if fnmatch(case, pattern):
                found[pattern] = runs[i] if len(runs) == len(names) else runs[0]
    if not found:
        raise KeyError(f"tiny_dit_config.json run_configs_note maps no run config onto {case!r}")
    return found.get(case) or next(iter(found.values()))
