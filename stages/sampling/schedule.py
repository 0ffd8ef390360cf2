"""Timestep schedules of the MAGI-1 chunk pipeline (DESIGN.md section 3).

Convention: t in [0, 1], t = 0 pure noise, t = 1 clean (flow matching,
x_t = (1 - t) x_0 + t x_1). Both functions are pure: the same arguments
always give the same values, bit for bit, and nothing is cached or counted.
"""

from __future__ import annotations

import torch

from stages.errors import InvalidInput

SHORTCUT_MODES = ("8,16,16", "16,16,8")
SHORTCUT_STEPS = 12  # the step count with the shortcut schedule (reference ``init_t``)
SD3_SHIFT = 3.0


def _check(num_steps: int, shortcut_mode: str) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise InvalidInput("num_steps", f"must be a positive integer, got {num_steps!r}")
    if shortcut_mode not in SHORTCUT_MODES:
        raise InvalidInput("shortcut_mode", f"must be one of {SHORTCUT_MODES}, got {shortcut_mode!r}")


def _shortcut_grid(shortcut_mode: str) -> torch.Tensor:
    """The 13-point base grid of the 12-step shortcut schedule (float32, before the transform).

    Each quarter [q/4, (q+1)/4) holds three points: offsets {0, 2/16, 3/16}
    for "8,16,16" (steps of 1/8, 1/16, 1/16) or {0, 1/16, 2/16} for
    "16,16,8"; the grid ends at 1 (reference ``init_t``, num_steps == 12).
    """
    base_t = torch.linspace(0, 1, 4 + 1) / 4
    accu = torch.linspace(0, 1, 4 + 1)
    if shortcut_mode == "16,16,8":
        base_t = base_t[:3]
    else:
        base_t = torch.cat([base_t[:1], base_t[2:4]], dim=0)
    return torch.cat([base_t + a for a in accu], dim=0)[:13]


def init_t(num_steps: int, shortcut_mode: str = "8,16,16") -> torch.Tensor:
    """Timestep schedule T[0..N] of one chunk's denoising (reference ``init_t``, sd3 transform).

    T = s(g**2) with g = linspace(0, 1, N + 1) (or the shortcut grid when
    N == 12) and the SD3 resolution shift in MAGI-1's reversed convention
    s(x) = (1/3) x / (1 + (1/3 - 1) x)  (shift 3). Computed in float32 with the
    reference's operation order, so the values equal the reference bit for bit
    (the last one is 1.0000001 in float32, not 1). The quarter points
    T[N/4], T[N/2], T[3N/4] are the ``cfg_t_range`` boundaries 0.0217, 0.1, 0.3.

    Args:
        num_steps: N, denoising steps per chunk (> 0).
        shortcut_mode: "8,16,16" or "16,16,8"; only used when N == 12.

    Returns:
        float32 tensor (N + 1,), nondecreasing, T[0] = 0.

    Raises:
        InvalidInput: ``num_steps`` not a positive int, or unknown ``shortcut_mode``.
    """
    _check(num_steps, shortcut_mode)
    if num_steps == SHORTCUT_STEPS:
        t = _shortcut_grid(shortcut_mode)
    else:
        t = torch.linspace(0, 1, num_steps + 1)
    t = t**2
    shift_inv = 1.0 / SD3_SHIFT
    return shift_inv * t / (1 + (shift_inv - 1) * t)


def init_intervals(num_steps: int, shortcut_mode: str = "8,16,16") -> list[float]:
    """Shortcut step-size multiplier per denoise index (reference ``init_intervel``).

    For N divisible by 3 the pattern [2, 1, 1] ("8,16,16") or [1, 1, 2]
    ("16,16,8") is repeated N / 3 times, else all ones. The engine feeds
    ``intervals[denoise_idx]`` to the distilled model's step-size embedding
    (reference ``SampleTransport.forward_velocity``: ``time_interval[denoise_idx]``).

    Returns:
        N floats.

    Raises:
        InvalidInput: as :func:`init_t`.
    """
    _check(num_steps, shortcut_mode)
    if num_steps % 3:
        return [1.0] * num_steps
    pattern = [1.0, 1.0, 2.0] if shortcut_mode == "16,16,8" else [2.0, 1.0, 1.0]
    return pattern * (num_steps // 3)


def distill_step_size(num_steps: int, interval: float) -> float:
    """Step size fed to a shortcut-distilled model's step-size embedding (reference
    ``get_embedding_and_meta``, ``engine_config.distill``): ``num_steps / 4 * 2``, or
    ``4 / interval * 2`` for the 12-step shortcut schedule, where ``interval`` is the plan's
    ``distill_interval`` (:func:`init_intervals` at the denoise index)."""
    if num_steps == SHORTCUT_STEPS:
        return 4 / interval * 2
    return num_steps / 4 * 2
