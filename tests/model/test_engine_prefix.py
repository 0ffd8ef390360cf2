"""V2V prefix length is a request field: the engine takes it from the job's prefix latent (its T)."""

from __future__ import annotations

import pytest
import torch

from cluster.engine import Engine
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, Progress, PromptSegment
from cluster.scheduler.plan import SlotRole
from stages.config import magi_tiny
from stages.dit.weights import load_dit, write_tiny_checkpoint
from tests.model.dit_fixtures import ForwardRecorder, job_state

SIZE = 64  # video pixels: 8x8 latents keep the runs short


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = magi_tiny()
    path = tmp_path_factory.mktemp("prefix_dit")
    write_tiny_checkpoint(cfg.dit, path, seed=0)
    return Engine(cfg, load_dit(path, cfg.dit))


def _job(cfg, prefix: torch.Tensor) -> EngineJob:
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(cfg.dit.caption_max_length, cfg.dit.caption_channels, generator=g)
    mask = torch.zeros(cfg.dit.caption_max_length, dtype=torch.int64)
    mask[:8] = 1
    spec = JobSpec(job_id=f"v2v-{prefix.shape[1]}", prompt_segments=(PromptSegment(0, "a"),), num_chunks=1,
                   height=SIZE, width=SIZE, seed=5, num_steps=4)
    return EngineJob(spec, ((0, CaptionEmbedding(emb, mask)),), prefix_latent=prefix)


def _run(engine, job):
    """Run ``job`` alone; returns (its handle, its JobState, steps, K/V chunks held after the first
    step, the main window input of the first denoising step, its LatentChunks)."""
    recorder = ForwardRecorder(engine)
    try:
        handle = engine.submit(job)
        st = job_state(engine, job.spec.job_id)
        steps, kv_after_first, first_denoise, chunks = 0, None, None, []
        while engine.has_work:
            events = engine.step()
            steps += bool(recorder.calls)
            if kv_after_first is None:
                kv_after_first = list(st.ctx.kv.chunks)
            if first_denoise is None and any(isinstance(e, Progress) for e in events):
                first_denoise = recorder.calls[0][0].x
            recorder.calls = []
            chunks += [e for e in events if isinstance(e, LatentChunk)]
    finally:
        engine.runner.forward_packed = recorder.inner
    return handle, st, steps, kv_after_first, first_denoise, chunks


@pytest.mark.parametrize("prefix_frames,offset,leftover", [(6, 1, 0), (15, 2, 3)])
def test_prefix_length_comes_from_the_job(engine, prefix_frames, offset, leftover):
    cfg = engine.model_cfg
    cw, h, w = cfg.sampling.chunk_width, SIZE // 8, SIZE // 8
    video = torch.randn(16, 15, h, w, generator=torch.Generator().manual_seed(9))
    prefix = video[:, :prefix_frames]
    handle, st, steps, kv_first, x_first, chunks = _run(engine, _job(cfg, prefix))
    assert st.ctx.chunk_offset == offset and st.ctx.prefix_frames == prefix_frames
    assert steps == handle.total_forwards + 1  # + the prefix K/V extraction step
    assert kv_first == list(range(offset))  # every whole prefix chunk's K/V written at step 0
    assert [c.index for c in chunks] == [0]
    assert chunks[0].latent.shape == (16, cw - leftover, h, w)  # prefix frames of the chunk are cut
    # the first denoising window starts at the first generated chunk, its leading frames = leftover prefix
    assert x_first.shape[1] == cw
    torch.testing.assert_close(x_first[:, :leftover], prefix[:, offset * cw :])


def test_two_prefix_lengths_give_different_continuations(engine):
    cfg = engine.model_cfg
    h, w = SIZE // 8, SIZE // 8
    video = torch.randn(16, 12, h, w, generator=torch.Generator().manual_seed(4))
    short = _run(engine, _job(cfg, video[:, :6]))[5][0].latent
    long = _run(engine, _job(cfg, video))[5][0].latent
    assert short.shape == long.shape
    assert (short - long).abs().max() > 1e-3


def test_plan_has_one_prefix_slot_per_whole_prefix_chunk(engine):
    cfg = engine.model_cfg
    h, w = SIZE // 8, SIZE // 8
    job = _job(cfg, torch.zeros(16, 13, h, w))
    engine.submit(job)
    plan = job_state(engine, job.spec.job_id).sched.next_plan()
    assert plan.is_prefix_extraction and [s.role for s in plan.slots] == [SlotRole.PREFIX] * 2
    assert engine.cancel(job.spec.job_id)
    engine.step()  # its JobFinished
    assert not engine.has_work
