"""Long and live streams: chunk-wise prompt updates, exact resume, endless jobs, RoPE position policy."""

from __future__ import annotations

import pytest
import torch

from cluster.engine import Engine, JobNotFound
from cluster.engine.job import NoiseSource, chunk_seed
from stages.errors import InvalidInput
from tests.model.engine_fixtures import caption, drain, make_job, max_diff, run_alone, tiny  # noqa: F401


def _with_update(cfg, dit, start_chunk, at_step):
    engine = Engine(cfg, dit)
    engine.submit(make_job("p", 6, seed=4, steps=8))

    def on_step(i, eng):
        if i == at_step and start_chunk is not None:
            eng.update_prompt("p", start_chunk, caption(9, valid=20))

    return drain(engine, on_step)["p"]


def test_prompt_update_from_chunk_k_leaves_earlier_chunks_bitwise(tiny):
    cfg, dit = tiny
    base = _with_update(cfg, dit, None, 0)
    changed = _with_update(cfg, dit, 3, at_step=2)  # chunks 0..2 are in flight at step 2
    assert all(torch.equal(base[c], changed[c]) for c in range(3))
    assert all((base[c] - changed[c]).abs().max() > 1e-3 for c in range(3, 6))


def test_prompt_update_rejects_chunks_in_flight_and_unknown_jobs(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit)
    engine.submit(make_job("p", 6, seed=4))
    engine.update_prompt("p", 0, caption(5))  # nothing started yet: chunk 0 may still change
    for _ in range(3):
        engine.step()  # chunks 0..2 have entered the window
    with pytest.raises(InvalidInput) as err:
        engine.update_prompt("p", 2, caption(5))
    assert err.value.field == "start_chunk" and "earliest chunk a new prompt can start at is 3" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        engine.update_prompt("p", 6, caption(5))
    assert err.value.field == "start_chunk"
    with pytest.raises(InvalidInput) as err:
        engine.update_prompt("p", 4, caption(5, length=3, channels=2))
    assert err.value.field == "caption"
    engine.update_prompt("p", 3, caption(5))
    with pytest.raises(JobNotFound):
        engine.update_prompt("nope", 3, caption(5))


@pytest.mark.parametrize("prefix_chunks", [0, 1])
def test_resume_from_snapshot_reproduces_later_chunks_bitwise(tiny, prefix_chunks):
    cfg, dit = tiny
    prefix = None
    if prefix_chunks:
        prefix = torch.randn(16, cfg.sampling.chunk_width + 2, 8, 8, generator=torch.Generator().manual_seed(1))
    job = make_job("r", 6, seed=5, steps=8, prefix=prefix)
    full = run_alone(Engine(cfg, dit), job)
    first = Engine(cfg, dit)
    first.submit(job)
    got, snap = {}, None
    while first.has_work and snap is None:
        for e in first.step():
            if hasattr(e, "latent"):
                got[e.index] = e.latent
        if len(got) == 2:
            snap = first.snapshot("r")
            first.cancel("r")  # e.g. the replica is lost
    assert snap.chunks_emitted == 2 and len(snap.kv) <= max(cfg.sampling.noise2clean_kvrange) - 1
    assert len(snap.latents) <= cfg.sampling.window_size and snap.nbytes > 0
    second = Engine(cfg, dit)
    second.submit(job, resume=snap)
    rest = drain(second)["r"]
    assert sorted(rest) == [2, 3, 4, 5]
    assert all(torch.equal(rest[c], full[c]) for c in rest)
    with pytest.raises(InvalidInput) as err:
        Engine(cfg, dit).submit(make_job("other", 6, seed=5), resume=snap)
    assert err.value.field == "resume"


def test_endless_stream_matches_finite_job_and_uses_per_chunk_noise(tiny):
    """num_chunks None runs until cancelled; its chunks equal a finite job's (noise of chunk c from
    a generator seeded by (seed, c), block-causal attention)."""
    cfg, dit = tiny
    engine = Engine(cfg, dit)
    handle = engine.submit(make_job("s", None, seed=6))
    got = {}

    def on_step(i, eng):
        if len(got) >= 5 and not handle.done:
            eng.cancel("s")

    while True:
        on_step(0, engine)
        if not engine.has_work:
            break
        for e in engine.step():
            if hasattr(e, "latent"):
                got[e.index] = e.latent
    assert handle.state == "cancelled" and handle.num_chunks is None and sorted(got)[:5] == [0, 1, 2, 3, 4]
    finite = run_alone(Engine(cfg, dit), make_job("f", 5, seed=6))
    for c in range(5):
        torch.testing.assert_close(got[c], finite[c], atol=1e-5, rtol=1e-4)
    src = NoiseSource(6, (16, 6, 8, 8))
    expect = torch.randn((16, 6, 8, 8), generator=torch.Generator().manual_seed(chunk_seed(6, 1000)))
    assert torch.equal(src.chunk(1000, "cpu"), expect)


def test_rope_positions_stay_bounded_and_short_jobs_unchanged(tiny):
    cfg, dit = tiny
    short = make_job("short", 5, seed=7)
    a = run_alone(Engine(cfg, dit, rope_horizon_chunks=9), short)
    b = run_alone(Engine(cfg, dit, rope_horizon_chunks=None), short)
    assert max_diff(a, b) == 0.0  # within the horizon: the reference's absolute positions

    long = make_job("long", 16, seed=7)
    engine = Engine(cfg, dit, rope_horizon_chunks=9)
    st = engine.submit(long)._st
    spans, bases, out = [], [], {}
    while engine.has_work:
        for e in engine.step():
            if hasattr(e, "latent"):
                out[e.index] = e.latent
        if st.state == "active":  # window end relative to the RoPE base, in chunks
            spans.append(st.ctx.max_started + 1 - st.ctx.kv.ring.rope_base)
            bases.append(st.ctx.kv.ring.rope_base)
    assert max(bases) > 0 and max(spans) <= 9  # time positions < horizon * chunk_width latent frames
    absolute = run_alone(Engine(cfg, dit, rope_horizon_chunks=None), long)
    diff = max_diff(out, absolute)
    assert 0 < diff < 1e-4  # RoPE is shift-invariant: only float32 rounding of the rotations differs
    assert max_diff({c: out[c] for c in range(6)}, {c: absolute[c] for c in range(6)}) == 0.0  # before re-basing
