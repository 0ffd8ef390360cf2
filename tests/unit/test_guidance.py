"""cfg_scales / combine_cfg3 / distill_blend (reference ``get_cfg_scale``, ``forward_dispatcher``)."""

from __future__ import annotations

import pytest
import torch

from stages.config import SamplingConfig
from stages.errors import InvalidInput
from stages.sampling import cfg_scales, combine_cfg3, distill_blend, distill_step_size, init_intervals, init_t

SHIPPED = SamplingConfig()
RANGE = SHIPPED.cfg_t_range  # (0, 0.0217, 0.1, 0.3, 0.999)
# distinct scales per range, so that every boundary decision is visible
PREV = (1.0, 2.0, 3.0, 4.0, 5.0)
TEXT = (10.0, 20.0, 30.0, 40.0, 50.0)


def _f32(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize(
    "t, index",
    [
        (0.0, 0),        # bounds - 1e-7 = [-1e-7, ...]: 0 is inside range 0
        (0.0216, 0),
        (0.0217, 1),     # a boundary belongs to the range it starts
        (0.02169995, 1), # ... and so does anything within 1e-7 below it
        (0.05, 1),
        (0.0999, 1),
        (0.1, 2),
        (0.2999, 2),
        (0.3, 3),
        (0.5, 3),
        (0.9989, 3),
        (0.999, 4),
        (0.9999, 4),     # clean_t
        (1.0000001, 4),  # last schedule value in fp32
    ],
)
def test_cfg_scales_boundaries_hand_computed(t, index):
    prev, text = cfg_scales(_f32([t]), RANGE, PREV, TEXT)
    assert prev.dtype == torch.float32 and text.dtype == torch.float32
    assert prev.tolist() == [PREV[index]] and text.tolist() == [TEXT[index]]


def test_cfg_scales_shipped_values_at_schedule_quarter_points():
    t = init_t(8)  # quarter points: 0.0217 (=1/46), 0.1, 0.30000001 in float32
    prev, text = cfg_scales(t, RANGE, SHIPPED.prev_chunk_scales, SHIPPED.text_scales)
    assert prev.tolist() == [1.5] * 6 + [1.0] * 3
    assert text.tolist() == [7.5] * 6 + [0.0] * 3  # text guidance off from t = 0.3 on
    # exact fp32 boundary values
    prev, text = cfg_scales(_f32([0.0217, 0.1, 0.3]), RANGE, SHIPPED.prev_chunk_scales, SHIPPED.text_scales)
    assert prev.tolist() == [1.5, 1.5, 1.0] and text.tolist() == [7.5, 7.5, 0.0]


def test_cfg_scales_per_chunk_vector_and_plain_floats():
    prev, text = cfg_scales([0.5, 0.1, 0.0], RANGE, PREV, TEXT)
    assert prev.tolist() == [4.0, 3.0, 1.0] and text.tolist() == [40.0, 30.0, 10.0]


def test_cfg_scales_errors_name_fields():
    with pytest.raises(InvalidInput) as err:
        cfg_scales(_f32([0.1]), RANGE, PREV[:4], TEXT)
    assert err.value.field == "cfg_t_range"
    with pytest.raises(InvalidInput) as err:
        cfg_scales(_f32([-0.5]), RANGE, PREV, TEXT)
    assert err.value.field == "t"


def _branches(k=3, width=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 16, k * width, 4, 4, generator=g) for _ in range(3)]


def test_text_scale_zero_ignores_cond_prev_text():
    u, cp, cpt = _branches()
    other = torch.randn_like(cpt) * 100
    a = combine_cfg3(u, cp, cpt, [1.5, 1.2, 0.7], [0.0, 0.0, 0.0])
    b = combine_cfg3(u, cp, other, [1.5, 1.2, 0.7], [0.0, 0.0, 0.0])
    assert torch.equal(a, b)


def test_prev_one_text_zero_returns_cond_prev():
    u, cp, cpt = _branches()
    assert torch.equal(combine_cfg3(u, cp, cpt, 1.0, 0.0), cp)
    assert torch.equal(combine_cfg3(u, cp, cpt, [1.0] * 3, [0.0] * 3, chunk_width=2), cp)


def test_prev_zero_text_zero_returns_uncond_and_equal_scales_skip_cond_prev():
    u, cp, cpt = _branches()
    assert torch.equal(combine_cfg3(u, cp, cpt, 0.0, 0.0), u)
    a = combine_cfg3(u, cp, cpt, 2.0, 2.0)
    b = combine_cfg3(u, cp + 5, cpt, 2.0, 2.0)
    assert torch.equal(a, b)


def test_combine_matches_reference_chunk_loop_bitwise():
    u, cp, cpt = _branches(k=3, width=2)
    t = _f32([0.5212766528129578, 0.10000000894069672, 0.0])
    p_s, t_s = cfg_scales(t, RANGE, SHIPPED.prev_chunk_scales, SHIPPED.text_scales)
    out = combine_cfg3(u, cp, cpt, p_s, t_s, chunk_width=2)
    for j in range(3):  # the reference's loop with 0-dim float32 scales
        p, s = p_s[j], t_s[j]
        sl = slice(2 * j, 2 * j + 2)
        ref = (1 - p) * u[:, :, sl] + (p - s) * cp[:, :, sl] + s * cpt[:, :, sl]
        assert torch.equal(out[:, :, sl], ref)
    assert torch.equal(out[:, :, :2], cp[:, :, :2])  # chunk 0 at t >= 0.3: just cond_prev


def test_combine_shape_errors():
    u, cp, cpt = _branches(k=3, width=2)
    with pytest.raises(InvalidInput) as err:
        combine_cfg3(u, cp[:, :, :4], cpt, 1.0, 0.0)
    assert err.value.field == "cond_prev"
    with pytest.raises(InvalidInput) as err:
        combine_cfg3(u, cp, cpt, [1.0] * 3, [0.0] * 3, chunk_width=3)
    assert err.value.field == "uncond"
    with pytest.raises(InvalidInput) as err:
        combine_cfg3(u, cp, cpt, [1.0] * 3, [0.0] * 2)
    assert err.value.field == "text_scale"


def test_distill_blend():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 16, 2, 4, 4, generator=g)
    assert torch.equal(distill_blend(a, b), a * 0.7 + b * (1 - 0.7))
    assert torch.equal(distill_blend(a, b, 1.0), a)
    assert torch.equal(distill_blend(a, b, 0.0), b)
    with pytest.raises(InvalidInput) as err:
        distill_blend(a, b[:, :, :1])
    assert err.value.field == "self_only"


@pytest.mark.parametrize("num_steps", [4, 8, 12, 16, 24, 32, 64])
@pytest.mark.parametrize("mode", ["8,16,16", "16,16,8"])
def test_distill_step_size_follows_the_shortcut_rule_of_init_t(num_steps, mode):
    """One home for the 12-step rule: the step size uses the intervals exactly where init_t
    uses the shortcut grid (where the schedule depends on the mode)."""
    intervals = init_intervals(num_steps, mode)
    sizes = {distill_step_size(num_steps, iv) for iv in intervals}
    other = "16,16,8" if mode == "8,16,16" else "8,16,16"
    if torch.equal(init_t(num_steps, mode), init_t(num_steps, other)):
        assert sizes == {num_steps / 4 * 2}
    else:
        assert sizes == {4 / iv * 2 for iv in intervals} and len(sizes) == 2
