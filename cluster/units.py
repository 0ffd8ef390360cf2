"""Byte units and the one way byte sizes are written for people (plan tables, logs, benchmarks)."""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
_UNITS = (("GiB", GiB), ("MiB", MiB), ("KiB", KiB))


def format_bytes(n: int | float, unit: str | None = None, digits: int = 2, width: int = 0) -> str:
    """``n`` bytes as ``"<value> <unit>"`` in binary units (KiB = 1024 bytes).

    Args:
        n: bytes (may be negative, e.g. a shortfall).
        unit: ``"GiB"``, ``"MiB"``, ``"KiB"`` or ``"B"``; None = the largest unit in which
            ``|n|`` is at least 1.
        digits: decimals; width: minimum width of the number (right-aligned, for tables).

    Raises:
        ValueError: an unknown unit.
    """
    scales = dict(_UNITS, B=1)
    if unit is None:
        unit = next((name for name, size in _UNITS if abs(n) >= size), "B")
    if unit not in scales:
        raise ValueError(f"unit must be one of {sorted(scales)}, got {unit!r}")
    value = n / scales[unit]
    return f"{value:{width}.{0 if unit == 'B' else digits}f} {unit}"
