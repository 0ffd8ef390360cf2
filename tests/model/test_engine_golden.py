"""End-to-end engine parity with the reference chunk pipeline (``golden_dit.json`` e2e cases).

The reference's noise and prepared per-chunk captions (``y[0]``) are injected; every clean
chunk the engine streams must equal the reference's yielded chunk.
"""

from __future__ import annotations

import pytest
import torch

from cluster.engine import Engine
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, Progress, PromptSegment
from tests.model.dit_fixtures import ATOL_E2E as ATOL, E2E_CASES, RTOL_E2E as RTOL, model_config_for_run, run_case


@pytest.mark.parametrize("case", list(E2E_CASES))
def test_engine_matches_reference_walk(case, golden_index, golden_tensors, golden_models, tiny_configs):
    meta = golden_index["cases"][case]
    job, events, steps = run_case(case, golden_index, golden_tensors, golden_models, tiny_configs)
    chunks = [e for e in events if isinstance(e, LatentChunk)]
    assert [c.index for c in chunks] == meta["yielded_chunk_indices"]
    assert steps == len(meta["forward_trace"])  # one step per reference forward_dispatcher call
    assert sum(isinstance(e, Progress) for e in events) == job.total_forwards
    worst = 0.0
    for c in chunks:
        ref = golden_tensors[f"{case}/chunk_{c.index}"][0]
        worst = max(worst, (c.latent - ref).abs().max().item())
        torch.testing.assert_close(c.latent, ref, atol=ATOL, rtol=RTOL)
    print(f"{case}: max abs diff over yielded chunks {worst:.3e}")
    assert job.kv_chunks == [] and job.done


def test_golden_null_captions_are_the_models(golden_tensors, golden_models):
    """The engine builds y[1] itself: null_caption_embedding with the first 50 tokens valid."""
    from cluster.engine.job import CaptionBook

    null_y, null_mask = CaptionBook.null_from(golden_models["base"].y_embedder.null_caption_embedding)
    y, masks = golden_tensors["e2e_t2v_base_cfg3/y"], golden_tensors["e2e_t2v_base_cfg3/y_masks"]
    for c in range(y.shape[1]):
        assert torch.equal(y[1, c], null_y) and torch.equal(masks[1, c], null_mask)


def test_trace_matches_reference_velocity(golden_index, golden_tensors, golden_models, tiny_configs):
    """Per-forward window input and combined velocity of the T2V cfg3 walk (``step_NNN``)."""
    case = "e2e_t2v_base_cfg3"
    meta = golden_index["cases"][case]
    run = tiny_configs["run_configs"][E2E_CASES[case]]
    dit = golden_models["base"]
    mc = model_config_for_run(run, dit.cfg)
    y, masks = golden_tensors[f"{case}/y"], golden_tensors[f"{case}/y_masks"]
    captions = tuple((r, CaptionEmbedding(y[0, r], masks[0, r])) for r in range(4))
    spec = JobSpec(job_id=case, prompt_segments=(PromptSegment(0, "g"),), num_chunks=4, height=64, width=64,
                   seed=1234, num_steps=meta["num_steps"])
    job = Engine(mc, dit).start(EngineJob(spec=spec, captions=captions), noise=golden_tensors[f"{case}/noise"])
    for step in range(job.total_forwards):
        job.step()
        out = job.last_outcome
        torch.testing.assert_close(out.x_in, golden_tensors[f"{case}/step_{step:03d}/x_in"][0], atol=ATOL, rtol=RTOL)
        ref_v = golden_tensors[f"{case}/step_{step:03d}/velocity"][0]
        skip = 2 if meta["forward_trace"][step]["kw"]["fwd_extra_1st_chunk"] else 0  # pass-through clean chunk
        torch.testing.assert_close(out.velocity[:, skip:], ref_v[:, skip:], atol=ATOL, rtol=RTOL)
