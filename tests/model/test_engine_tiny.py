"""The engine on the magi-tiny preset with random tiny weights: streaming, shapes, determinism, KV ring."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from cluster.engine import Engine
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, Progress, PromptSegment
from stages.errors import InvalidInput
from tests.model.dit_fixtures import job_state
from tests.model.engine_fixtures import tiny  # noqa: F401  (the shared magi-tiny DiT fixture)


def _caption(cfg, seed: int, valid: int = 7) -> CaptionEmbedding:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(cfg.text_encoder.max_length, cfg.dit.caption_channels, generator=gen)
    mask = torch.zeros(cfg.text_encoder.max_length, dtype=torch.int64)
    mask[:valid] = 1
    return CaptionEmbedding(emb, mask)


def _job(cfg, num_chunks, seed=7, captions=None, num_steps=None, **kw) -> EngineJob:
    spec = JobSpec(job_id=f"job-{num_chunks}-{seed}", prompt_segments=(PromptSegment(0, "a cat"),), num_chunks=num_chunks,
                   height=cfg.height, width=cfg.width, seed=seed, num_steps=num_steps or cfg.sampling.num_steps, **kw)
    return EngineJob(spec=spec, captions=captions or ((0, _caption(cfg, 1)),))


def _run(engine, job):
    """Run ``job`` alone to its end; returns (its handle, its events)."""
    handle = engine.submit(job)
    events = []
    while engine.has_work:
        events.extend(e for e in engine.step() if getattr(e, "job_id", None) == job.spec.job_id)
    return handle, events


def test_two_chunks_stream_in_order_with_shapes(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit)
    run, events = _run(engine, _job(cfg, 2))
    chunks = [e for e in events if isinstance(e, LatentChunk)]
    assert [c.index for c in chunks] == [0, 1]
    sp = cfg.sampling
    for c in chunks:
        assert c.latent.shape == (16, sp.chunk_width, cfg.height // 8, cfg.width // 8)
        assert c.latent.dtype == torch.float32 and torch.isfinite(c.latent).all()
        assert c.latent.std() > 0.05
    per = sp.num_steps // sp.window_size
    assert run.total_forwards == per * (2 + sp.window_size - 1)
    progress = [e for e in events if isinstance(e, Progress)]
    assert len(progress) == run.total_forwards
    # chunk 0 is emitted by the step where its own progress reaches num_steps, before chunk 1's
    first_emit = events.index(chunks[0])
    assert isinstance(events[first_emit - 1], Progress) and events[first_emit - 1].step == sp.num_steps
    assert events.index(chunks[0]) < events.index(chunks[1])
    assert run.state == "done" and not engine.has_work and engine.stats().kv_pool_free_blocks == engine.pool.num_blocks


def test_chunk_noise_is_per_chunk_and_past_chunks_do_not_see_future(tiny):
    """Chunk 0 of a 1-chunk and of a 3-chunk job with the same seed are identical (noise from
    (seed, chunk), block-causal attention); a different seed changes it."""
    cfg, dit = tiny
    engine = Engine(cfg, dit)
    one = [e for e in _run(engine, _job(cfg, 1))[1] if isinstance(e, LatentChunk)]
    three = [e for e in _run(engine, _job(cfg, 3))[1] if isinstance(e, LatentChunk)]
    other = [e for e in _run(engine, _job(cfg, 1, seed=8))[1] if isinstance(e, LatentChunk)]
    torch.testing.assert_close(one[0].latent, three[0].latent, atol=1e-5, rtol=1e-4)
    assert (one[0].latent - other[0].latent).abs().max() > 1e-2


def test_prompt_segment_applies_from_its_start_chunk(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit)
    same = _job(cfg, 2, captions=((0, _caption(cfg, 1)),))
    switched = _job(cfg, 2, captions=((0, _caption(cfg, 1)), (1, _caption(cfg, 2, valid=20))))
    a = [e.latent for e in _run(engine, same)[1] if isinstance(e, LatentChunk)]
    b = [e.latent for e in _run(engine, switched)[1] if isinstance(e, LatentChunk)]
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_kv_ring_stays_bounded_on_long_job(tiny):
    cfg, dit = tiny
    sp = cfg.sampling
    engine, job = Engine(cfg, dit), _job(cfg, 7, num_steps=4)
    engine.submit(job)
    st, most = job_state(engine, job.spec.job_id), 0
    while engine.has_work:
        engine.step()
        if st.ctx.kv is not None:
            most = max(most, len(st.ctx.kv.chunks))
            assert st.ctx.kv.chunks == sorted(st.ctx.kv.chunks)
    print(f"KV ring: at most {most} chunks held")
    # window W = 4 chunks in flight and the widest KV range R = 5 chunks: only R - W clean
    # chunks below the window are ever read (the reference would keep all 6 clean chunks)
    assert 0 < most <= max(sp.noise2clean_kvrange) - sp.window_size


def test_endless_stream_until_cancelled(tiny):
    cfg, dit = tiny
    job = _job(cfg, 1, num_steps=4)
    spec = type(job.spec)(**{**job.spec.__dict__, "num_chunks": None})
    engine = Engine(cfg, dit)
    run = engine.submit(EngineJob(spec, job.captions))
    assert run.num_chunks is None and run.total_forwards is None
    got = []
    while len(got) < 2:
        got += [e.index for e in engine.step() if isinstance(e, LatentChunk)]
    assert got == [0, 1] and not run.done
    assert engine.cancel(run.job_id)
    assert run.state == "cancelled" and engine.stats().kv_pool_free_blocks == engine.pool.num_blocks
    assert [type(e).__name__ for e in engine.step()] == ["JobFinished"] and not engine.has_work


def test_v2v_prefix_and_i2v_image(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit)
    h, w = cfg.height // 8, cfg.width // 8
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(16, 1, h, w, generator=gen)
    i2v = [e for e in _run(engine, EngineJob(_job(cfg, 1).spec, _job(cfg, 1).captions, prefix_latent=image))[1]
           if isinstance(e, LatentChunk)]
    assert [c.index for c in i2v] == [0] and i2v[0].latent.shape[1] == cfg.sampling.chunk_width
    video = torch.randn(16, cfg.sampling.chunk_width + 2, h, w, generator=gen)  # 1 prefix chunk + 2 leftover frames
    run, events = _run(engine, EngineJob(_job(cfg, 1).spec, _job(cfg, 1).captions, prefix_latent=video))
    v2v = [e for e in events if isinstance(e, LatentChunk)]
    assert [c.index for c in v2v] == [0]
    assert v2v[0].latent.shape[1] == cfg.sampling.chunk_width - 2  # reference: frames before the prefix end are cut


def test_bad_inputs_name_the_field(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit)
    with pytest.raises(InvalidInput) as err:
        engine.submit(_job(cfg, 1, num_steps=6))
    assert err.value.field == "num_steps"
    with pytest.raises(InvalidInput) as err:
        engine.submit(EngineJob(_job(cfg, 1).spec, ((0, CaptionEmbedding(torch.zeros(4, 3), torch.ones(4))),)))
    assert err.value.field == "captions"
    with pytest.raises(InvalidInput) as err:
        engine.submit(EngineJob(_job(cfg, 1).spec, _job(cfg, 1).captions, prefix_latent=torch.zeros(16, 1, 3, 3)))
    assert err.value.field == "prefix_latent"


def test_steps_keep_no_window_tensors_alive(tiny):
    """Issue 10.5: every job kept its last step's window input and velocity (``last_outcome``)
    alive between steps, for tracing only. After a step, no branch window input of it survives."""
    cfg, dit = tiny
    engine, inputs = Engine(cfg, dit), []
    forward = engine.runner.forward_packed

    def recording(windows, kv):
        inputs.extend(weakref.ref(w.x) for w in windows)
        return forward(windows, kv)

    engine.runner.forward_packed = recording
    job = _job(cfg, 3, num_steps=4)
    engine.submit(job)
    for _ in range(2):
        engine.step()
    gc.collect()
    assert job_state(engine, job.spec.job_id).state == "active" and inputs
    assert [ref for ref in inputs if ref() is not None] == []
