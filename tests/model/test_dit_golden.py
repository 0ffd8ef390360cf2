"""Single-forward parity of MagiDiT with the reference ``VideoDiTModel`` (golden tiny weights)."""

from __future__ import annotations

import pytest
import torch

from stages.dit.model import MagiDiT

from tests.model.dit_fixtures import needs_golden, sf_case_input

SF_CASES = ["sf_base", "sf_base_kvmix", "sf_distill_ns8", "sf_distill_ns12_interval1", "sf_glu"]
ATOL, RTOL = 1e-5, 1e-4


def _model(case: str, golden_models) -> MagiDiT:
    return golden_models["glu" if "glu" in case else "base"]


@needs_golden
@pytest.mark.parametrize("case", SF_CASES)
def test_single_forward_matches_reference(case, golden_index, golden_tensors, golden_models):
    out = _model(case, golden_models)(sf_case_input(case, golden_index, golden_tensors))
    ref = golden_tensors[f"{case}/out"][0]
    diff = (out.velocity - ref).abs().max().item()
    print(f"{case}: max abs diff {diff:.3e}")
    torch.testing.assert_close(out.velocity, ref, atol=ATOL, rtol=RTOL)


@needs_golden
@pytest.mark.parametrize("case", ["sf_base", "sf_glu"])
def test_internals_match_reference(case, golden_index, golden_tensors, golden_models):
    model = _model(case, golden_models)
    inp = sf_case_input(case, golden_index, golden_tensors)
    ref = lambda n: golden_tensors[f"{case}/internal/{n}"]  # noqa: E731
    captured = {}
    hooks = [model.x_embedder.register_forward_hook(lambda m, a, o: captured.__setitem__("x_embed", o))]
    hooks.append(model.final_linear.register_forward_hook(lambda m, a, o: captured.__setitem__("final", o)))
    for i, layer in enumerate(model.videodit_blocks.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(f"layer{i}", o[0])))
    try:
        model(inp)
    finally:
        for h in hooks:
            h.remove()
    check = lambda got, want: torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)  # noqa: E731
    check(captured["x_embed"], ref("x_embed"))
    for i in range(len(model.videodit_blocks.layers)):
        check(captured[f"layer{i}"], ref(f"layer{i}_out")[:, 0])
    check(captured["final"], ref("final_linear_out")[:, 0])
    check(model.condition(inp.t, inp.caption_dropout)[None], ref("condition"))
    _, _, t, h, w = ref("x_embed").shape
    check(model.rope_rows(((3, 0),), t // 3, h, w), ref("rope"))
    y_flat, y_ranges = model.caption_tokens(inp.y, inp.y_mask)
    check(y_flat, ref("y_xattn_flat"))
    assert y_ranges.tolist() == [[0, 16], [16, 26], [26, 31]]


@needs_golden
def test_caption_dropout_selects_other_null_row(golden_index, golden_tensors, golden_models):
    """caption_dropout=True switches the adaLN row to null_caption_embedding[-1]: output must change."""
    model = golden_models["base"]
    inp = sf_case_input("sf_base", golden_index, golden_tensors)
    base = model(inp).velocity
    inp.caption_dropout = torch.ones_like(inp.caption_dropout)
    dropped = model(inp).velocity
    assert (base - dropped).abs().max() > 1e-3
    y = model.y_embedder
    expect = y.y_proj_adaln(y.null_caption_embedding[-1:]) + model.t_embedder(inp.t[:1])
    torch.testing.assert_close(model.condition(inp.t[:1], torch.ones(1, dtype=torch.bool)), expect)
