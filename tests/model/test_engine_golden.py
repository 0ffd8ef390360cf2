"""End-to-end engine parity with the reference chunk pipeline: every ``e2e_walk`` case of
golden_dit.json, run through ``Engine.submit`` / ``Engine.step`` with every setting read from the case.

The reference's noise and prepared per-chunk captions (``y[0]``) are injected; every clean
chunk the engine streams must equal the reference's yielded chunk, and where the reference
recorded per-forward tensors (``step_NNN/x_in``, ``step_NNN/velocity``) so must the engine's
window input and guidance-combined velocity of that forward.
"""

from __future__ import annotations

import re

import pytest
import torch

from cluster.engine import Engine
from cluster.messages import Progress
from tests.model.dit_fixtures import (
    ATOL_E2E as ATOL, RTOL_E2E as RTOL, case_job, dit_config_from_reference, model_config, run_case, run_config_name,
)
from tests.shared_data import golden_json, golden_params

E2E_CASES = golden_params("golden_dit.json", where=lambda c: c["kind"] == "e2e_walk")
_INDEX = golden_json("golden_dit.json") or {"tensors": {}}
TRACED_CASES = [c for c in E2E_CASES if f"{c}/step_000/velocity" in _INDEX["tensors"]] or E2E_CASES[:1]


def _engine_and_job(case, golden_index, golden_tensors, golden_models, tiny_configs):
    meta = golden_index["cases"][case]
    dit = golden_models[meta["model_config_name"]]
    run = tiny_configs["run_configs"][run_config_name(case, tiny_configs)]
    assert dit_config_from_reference(run["model_config"]) == dit.cfg
    mc = model_config(meta, run, dit.cfg)
    return meta, Engine(mc, dit, max_active_jobs=1), case_job(case, meta, golden_tensors, mc)


@pytest.mark.parametrize("case", E2E_CASES)
def test_engine_matches_reference_walk(case, golden_index, golden_tensors, golden_models, tiny_configs):
    meta, engine, job = _engine_and_job(case, golden_index, golden_tensors, golden_models, tiny_configs)
    run = run_case(engine, job, golden_tensors[f"{case}/noise"])
    assert [c.index for c in run.chunks] == meta["yielded_chunk_indices"]
    assert run.steps == len(meta["forward_trace"])  # one step per reference forward_dispatcher call
    progress = [e for e in run.events if isinstance(e, Progress)]
    assert len(progress) == sum(not t["kw"].get("extract_prefix_video_feature", False) for t in meta["forward_trace"])
    worst = 0.0
    for c in run.chunks:
        ref = golden_tensors[f"{case}/chunk_{c.index}"][0]
        worst = max(worst, (c.latent - ref).abs().max().item())
        torch.testing.assert_close(c.latent, ref, atol=ATOL, rtol=RTOL)
    print(f"{case}: max abs diff over yielded chunks {worst:.3e}")
    assert engine.stats().kv_pool_free_blocks == engine.stats().kv_pool_blocks  # KV region back in the pool


@pytest.mark.parametrize("case", E2E_CASES)
def test_golden_null_captions_are_the_models(case, golden_index, golden_tensors, golden_models):
    """The engine builds y[1] itself: null_caption_embedding with the first 50 tokens valid."""
    from cluster.engine.job import CaptionBook

    dit = golden_models[golden_index["cases"][case]["model_config_name"]]
    null_y, null_mask = CaptionBook.null_from(dit.y_embedder.null_caption_embedding)
    y, masks = golden_tensors[f"{case}/y"], golden_tensors[f"{case}/y_masks"]
    for c in range(y.shape[1]):
        assert torch.equal(y[1, c], null_y) and torch.equal(masks[1, c], null_mask)


def _cfg3_velocity(windows, n: int, cw: int, meta: dict) -> torch.Tensor:
    """Reference ``forward_3cfg``: v = (1 - p) u + (p - s) c_p + s c_pt for the n denoising chunks,
    p, s picked by ``searchsorted(cfg_t_range - 1e-7, t) - 1`` (golden README, "CFG, cfg_number = 3").
    Branch windows: c_pt has caption_dropout False; c_p (whole window) and u (denoising chunks)
    have it True; a branch the engine left out has weight 0."""
    (main_w, c_p), *rest = sorted(((w, v) for w, v in windows if bool(w.caption_dropout.all())), key=lambda p: -p[0].k)
    t = main_w.t[-n:]
    idx = torch.searchsorted(torch.tensor(meta["cfg_t_range"]) - 1e-7, t) - 1
    p = torch.tensor(meta["prev_chunk_scales"])[idx].repeat_interleave(cw)[None, :, None, None]
    s = torch.tensor(meta["text_scales"])[idx].repeat_interleave(cw)[None, :, None, None]
    v = c_p[:, -n * cw :]
    text = [v_ for w, v_ in windows if not bool(w.caption_dropout.any())]
    out = (p - s) * v + (s * text[0][:, -n * cw :] if text else 0)
    return out + ((1 - p) * rest[0][1] if rest else 0)


def _cfg1_velocity(windows, k: int, n: int, cw: int, meta: dict) -> torch.Tensor:
    """Reference cfg_number 1: one forward; with a nearly-clean self-only copy appended, the first
    denoising chunk becomes ``w * with_history + (1 - w) * self_only`` (w = ``prev_chunks_scale``)."""
    ((main_w, v),) = windows
    out = v[:, : k * cw].clone()
    if main_w.k > k:
        w = float(re.findall(r"\d*\.\d+", meta["prev_chunks_scale_env"])[0])
        j = slice((k - n) * cw, (k - n + 1) * cw)
        out[:, j] = w * out[:, j] + (1 - w) * v[:, k * cw :]
    return out[:, -n * cw :]


@pytest.mark.parametrize("case", TRACED_CASES)
def test_trace_matches_reference_velocity(case, golden_index, golden_tensors, golden_models, tiny_configs):
    """Per forward: the window input (``step_NNN/x_in``) and guidance-combined velocity
    (``step_NNN/velocity``) of the engine's forwards, from the packed windows the engine ran."""
    meta, engine, job = _engine_and_job(case, golden_index, golden_tensors, golden_models, tiny_configs)
    run = run_case(engine, job, golden_tensors[f"{case}/noise"], record=True)
    cw = meta["chunk_width"]
    assert len(run.forwards) == len(meta["forward_trace"])
    for windows, trace in zip(run.forwards, meta["forward_trace"]):
        kw = trace["kw"]
        if kw.get("extract_prefix_video_feature", False):
            continue
        key = f"{case}/step_{trace['global_step']:03d}"
        k = kw["denoising_range_num"]
        n = k - int(kw["fwd_extra_1st_chunk"])  # the clean re-forward chunk's velocity is a pass-through
        main = max((w for w, _ in windows), key=lambda w: w.k)
        if f"{key}/x_in" in golden_tensors:
            torch.testing.assert_close(main.x[:, : k * cw], golden_tensors[f"{key}/x_in"][0], atol=ATOL, rtol=RTOL)
        if meta["cfg_number"] == 3:
            got = _cfg3_velocity(windows, n, cw, meta)
        else:
            got = _cfg1_velocity(windows, k, n, cw, meta)
        torch.testing.assert_close(got, golden_tensors[f"{key}/velocity"][0][:, -n * cw :], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{key}: {m}")
