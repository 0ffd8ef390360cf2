"""Branch selection and combination in one home (stages.sampling.guidance): which branches a
step runs and how their outputs make the window's velocity, against the per-chunk scales of
``cfg_scales`` (reference ``forward_dispatcher``)."""

from __future__ import annotations

import pytest
import torch

from stages.config import SamplingConfig
from stages.sampling import (
    Branch,
    cfg_scales,
    combine_cfg3,
    distill_blend,
    guided_velocity,
    history_branch,
    init_t,
    select_branches,
)

SHIPPED = SamplingConfig()
DISTILLED = SamplingConfig(cfg_number=1, distill=True)


def _windows(sp: SamplingConfig):
    """Every n-chunk tail of the shipped schedule, as a step's denoising timesteps."""
    t = init_t(sp.num_steps)[:-1]
    return [t[i : i + n] for n in range(sp.window_size + 1) for i in range(len(t) - n + 1)]


def test_branch_words_have_one_meaning():
    assert [b for b in Branch if b.uses_caption] == [Branch.COND_PREV_TEXT]
    assert [b for b in Branch if not b.sees_history] == [Branch.UNCOND]
    assert history_branch(SHIPPED.cfg_number) is Branch.COND_PREV
    assert history_branch(DISTILLED.cfg_number) is Branch.COND_PREV_TEXT


@pytest.mark.parametrize("t", _windows(SHIPPED), ids=lambda t: f"n{t.numel()}")
def test_cfg3_runs_a_branch_iff_its_weight_is_nonzero_somewhere(t):
    g = select_branches(SHIPPED, t)
    assert g.branches[0] is Branch.COND_PREV and list(g.branches) == [b for b in Branch if b in g.branches]
    if t.numel() == 0:
        assert g.branches == (Branch.COND_PREV,) and g.prev_scale is None
        return
    p, s = cfg_scales(t, SHIPPED.cfg_t_range, SHIPPED.prev_chunk_scales, SHIPPED.text_scales)
    assert torch.equal(g.prev_scale, p) and torch.equal(g.text_scale, s)
    assert (Branch.COND_PREV_TEXT in g.branches) == bool((s != 0).any())
    assert (Branch.UNCOND in g.branches) == bool((p != 1).any())


@pytest.mark.parametrize("nearly_clean", [False, True])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_cfg1_runs_one_branch_and_a_self_only_copy_when_nearly_clean(n, nearly_clean):
    g = select_branches(DISTILLED, init_t(DISTILLED.num_steps)[:n], nearly_clean)
    assert g.branches == (Branch.COND_PREV_TEXT,) and g.self_only == (nearly_clean and n > 0)


def _velocities(k: int, n: int, cw: int, branches, gen) -> dict:
    shape = lambda chunks: (4, chunks * cw, 2, 3)  # noqa: E731
    return {b: torch.randn(shape(n if b is Branch.UNCOND else k), generator=gen) for b in branches}


@pytest.mark.parametrize("t", [t for t in _windows(SHIPPED) if t.numel()], ids=lambda t: f"n{t.numel()}")
def test_cfg3_combination_matches_combine_cfg3_with_absent_branches_as_zero(t):
    cw, n = SHIPPED.chunk_width, t.numel()
    k = n + 1  # a clean re-forward chunk leads the window
    g = select_branches(SHIPPED, t)
    v = _velocities(k, n, cw, g.branches, torch.Generator().manual_seed(n))
    out = guided_velocity(g, v, n, cw, SHIPPED.prev_chunks_scale)
    cond = v[Branch.COND_PREV][:, -n * cw :]
    zero = torch.zeros_like(cond)
    text = v[Branch.COND_PREV_TEXT][:, -n * cw :] if Branch.COND_PREV_TEXT in v else zero
    want = combine_cfg3(v.get(Branch.UNCOND, zero), cond, text, g.prev_scale, g.text_scale, chunk_width=cw)
    assert torch.equal(out[:, : -n * cw], v[Branch.COND_PREV][:, : -n * cw]) and torch.equal(out[:, -n * cw :], want)


@pytest.mark.parametrize("n", [1, 3])
def test_cfg1_self_only_copy_is_blended_into_the_first_denoising_chunk(n):
    cw, k = DISTILLED.chunk_width, n + 1
    g = select_branches(DISTILLED, init_t(DISTILLED.num_steps)[:n], True)
    hist = torch.randn(4, (k + 1) * cw, 2, 3, generator=torch.Generator().manual_seed(n))
    out = guided_velocity(g, {Branch.COND_PREV_TEXT: hist}, n, cw, DISTILLED.prev_chunks_scale)
    j = k - n
    seg = slice(j * cw, (j + 1) * cw)
    want = hist[:, : k * cw].clone()
    want[:, seg] = distill_blend(hist[:, seg], hist[:, k * cw :], DISTILLED.prev_chunks_scale)
    assert out.shape == want.shape and torch.equal(out, want)
    plain = select_branches(DISTILLED, init_t(DISTILLED.num_steps)[:n], False)
    assert torch.equal(guided_velocity(plain, {Branch.COND_PREV_TEXT: hist[:, : k * cw]}, n, cw, 0.7), hist[:, : k * cw])
