"""Single-forward parity of MagiDiT with the reference ``VideoDiTModel`` (golden tiny weights):
every ``single_forward`` case of golden_dit.json, settings read from the case."""

from __future__ import annotations

import pytest
import torch

from tests.model.dit_fixtures import ATOL_SF as ATOL, RTOL_SF as RTOL, forward_window, sf_case
from tests.shared_data import golden_json, golden_params

SF_CASES = golden_params("golden_dit.json", where=lambda c: c["kind"] == "single_forward")
_INDEX = golden_json("golden_dit.json") or {"tensors": {}}
INTERNAL_CASES = [c for c in SF_CASES if f"{c}/internal/x_embed" in _INDEX["tensors"]] or SF_CASES[:1]


@pytest.mark.parametrize("case", SF_CASES)
def test_single_forward_matches_reference(case, golden_index, golden_tensors, golden_models, tiny_configs):
    sf = sf_case(case, golden_index, golden_tensors, tiny_configs)
    out = forward_window(golden_models[sf.model], **sf.inputs)
    ref = golden_tensors[f"{case}/out"][0]
    print(f"{case}: max abs diff {(out - ref).abs().max().item():.3e}")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", INTERNAL_CASES)
def test_internals_match_reference(case, golden_index, golden_tensors, golden_models, tiny_configs):
    sf = sf_case(case, golden_index, golden_tensors, tiny_configs)
    model, inp = golden_models[sf.model], sf.inputs
    ref = lambda n: golden_tensors[f"{case}/internal/{n}"]  # noqa: E731
    captured = {}
    hooks = [model.x_embedder.register_forward_hook(lambda m, a, o: captured.__setitem__("x_embed", o))]
    hooks.append(model.final_linear.register_forward_hook(lambda m, a, o: captured.__setitem__("final", o)))
    for i, layer in enumerate(model.videodit_blocks.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(f"layer{i}", o[0])))
    try:
        forward_window(model, **inp)
    finally:
        for h in hooks:
            h.remove()
    check = lambda got, want: torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)  # noqa: E731
    check(captured["x_embed"], ref("x_embed"))
    for i in range(len(model.videodit_blocks.layers)):
        check(captured[f"layer{i}"], ref(f"layer{i}_out")[:, 0])
    check(captured["final"], ref("final_linear_out")[:, 0])
    k = inp["t"].shape[0]
    check(model.condition(inp["t"], torch.zeros(k, dtype=torch.bool), inp["distill_dt"])[None], ref("condition"))
    _, _, t, h, w = ref("x_embed").shape
    check(model.rope_rows(((k, 0),), t // k, h, w), ref("rope"))
    y_flat, y_ranges = model.caption_tokens(inp["y"], inp["y_mask"])
    check(y_flat, ref("y_xattn_flat"))
    ends = inp["y_mask"].sum(dim=1).cumsum(0)
    assert y_ranges.tolist() == [[int(a), int(b)] for a, b in zip([0, *ends[:-1].tolist()], ends.tolist())]


@pytest.mark.parametrize("case", SF_CASES)
def test_caption_dropout_selects_other_null_row(case, golden_index, golden_tensors, golden_models, tiny_configs):
    """caption_dropout=True switches the adaLN row to null_caption_embedding[-1]: output must change."""
    sf = sf_case(case, golden_index, golden_tensors, tiny_configs)
    model, inp = golden_models[sf.model], sf.inputs
    k = inp["t"].shape[0]
    base = forward_window(model, **inp)
    dropped = forward_window(model, **{**inp, "caption_dropout": torch.ones(k, dtype=torch.bool)})
    assert (base - dropped).abs().max() > 1e-3
    y = model.y_embedder
    dt = None if inp["distill_dt"] is None else inp["distill_dt"][:1]
    expect = y.y_proj_adaln(y.null_caption_embedding[-1:]) + model.t_embedder(inp["t"][:1])
    expect = expect if dt is None else expect + model.t_embedder(dt)
    torch.testing.assert_close(model.condition(inp["t"][:1], torch.ones(1, dtype=torch.bool), dt), expect)
