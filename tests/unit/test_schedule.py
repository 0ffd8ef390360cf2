"""init_t / init_intervals against the reference golden schedules (bit for bit, float32)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from stages.errors import InvalidInput
from stages.sampling import init_intervals, init_t

from tests.shared_data import golden_params

INIT_T = golden_params("schedules.json", "init_t")
INIT_INTERVALS = golden_params("schedules.json", "init_intervel")


@pytest.fixture(scope="module")
def schedules(golden_dir) -> dict:
    return json.loads((golden_dir / "schedules.json").read_text())


def _key_args(key: str) -> tuple[int, str]:
    steps, mode = key.split(",shortcut_mode=")
    return int(steps.split("=")[1]), mode


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


@pytest.mark.parametrize("key", INIT_T)
def test_init_t_matches_reference_bit_for_bit(key, schedules):
    num_steps, mode = _key_args(key)
    t = init_t(num_steps, mode)
    assert t.dtype == torch.float32 and t.shape == (num_steps + 1,)
    ref = torch.tensor(schedules["init_t"][key], dtype=torch.float32)
    assert torch.equal(t, ref), (t - ref).abs().max()
    assert t.tolist() == schedules["init_t"][key]  # the floats the scheduler receives


@pytest.mark.parametrize("key", INIT_INTERVALS)
def test_init_intervals_matches_reference(key, schedules):
    num_steps, mode = _key_args(key)
    got = init_intervals(num_steps, mode)
    assert got == [float(x) for x in schedules["init_intervel"][key]]
    assert all(isinstance(x, float) for x in got)


@pytest.mark.parametrize("num_steps", [4, 8, 16, 32, 64])
def test_quarter_points_are_cfg_boundaries(num_steps):
    t = init_t(num_steps).tolist()
    q = num_steps // 4
    # the quarter points are the cfg_t_range boundaries 0.0217 (= 1/46), 0.1, 0.3 (DESIGN.md section 3)
    assert t[q] == pytest.approx(1 / 46, abs=1e-8) and t[q] == pytest.approx(0.0217, abs=1e-4)
    assert t[2 * q] == pytest.approx(0.1, abs=1e-8)
    assert t[3 * q] == _f32(0.3) and t[3 * q] > 0.3  # fp32 0.30000001 (counts as "> 0.3")
    assert t[0] == 0.0 and t[-1] == pytest.approx(1.0, abs=2e-7)
    assert all(a < b for a, b in zip(t, t[1:]))


def test_shortcut_modes_differ_only_for_twelve_steps():
    for n in (8, 16, 32):
        assert torch.equal(init_t(n, "8,16,16"), init_t(n, "16,16,8"))
    a, b = init_t(12, "8,16,16"), init_t(12, "16,16,8")
    assert not torch.equal(a, b)
    # both pass through the same quarter points (shortcut grid = 4 quarters x 3 steps)
    assert a[[0, 3, 6, 9, 12]].tolist() == b[[0, 3, 6, 9, 12]].tolist()
    # "8,16,16": first step of each quarter is twice as long on the base grid (1/8 then 1/16, 1/16)
    assert init_t(12, "8,16,16")[1].item() == init_t(16)[2].item()
    assert init_t(12, "16,16,8")[1].item() == init_t(16)[1].item()


def test_pure_function_same_result_twice():
    assert torch.equal(init_t(64), init_t(64))
    assert init_intervals(12) == init_intervals(12)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, None])
def test_bad_num_steps_names_field(bad):
    with pytest.raises(InvalidInput) as err:
        init_t(bad)
    assert err.value.field == "num_steps"
    with pytest.raises(InvalidInput):
        init_intervals(bad)


def test_bad_shortcut_mode_names_field():
    with pytest.raises(InvalidInput) as err:
        init_t(12, "8,8,8")
    assert err.value.field == "shortcut_mode"

