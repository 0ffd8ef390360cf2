"""The one byte formatter (cluster.units.format_bytes) used by plan tables, logs and benchmarks."""

from __future__ import annotations

import pytest

from cluster.units import GiB, KiB, MiB, format_bytes


def test_auto_unit_is_the_largest_at_least_one():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * KiB) == "3.00 KiB"
    assert format_bytes(int(1.5 * MiB)) == "1.50 MiB"
    assert format_bytes(-2 * GiB) == "-2.00 GiB"  # a shortfall keeps its sign


def test_fixed_unit_digits_and_width_for_tables():
    assert format_bytes(GiB // 2, "GiB", 1) == "0.5 GiB"
    assert format_bytes(44 * GiB, "GiB", 2, 8) == "   44.00 GiB"
    assert format_bytes(5 * MiB, "MiB", 0) == "5 MiB"


def test_unknown_unit_is_named():
    with pytest.raises(ValueError, match="unit must be one of .*'TB'"):
        format_bytes(1, "TB")
