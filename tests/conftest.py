"""Fixtures for every test: the shared golden and inputs folders (see tests/shared_data.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import shared_data


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``../shared/golden`` (skips, or fails under MAGI_REQUIRE_GOLDEN=1, when absent)."""
    return shared_data.need(shared_data.golden_dir(), "golden data")


@pytest.fixture(scope="session")
def inputs_dir() -> Path:
    """``../shared/inputs`` (skips, or fails under MAGI_REQUIRE_GOLDEN=1, when absent)."""
    return shared_data.need(shared_data.inputs_dir(), "shared inputs")
