"""Continuous batching: many jobs' windows (and CFG branches) in one forward, admission, cancel, stats."""

from __future__ import annotations

import pytest

from cluster.engine import Engine, EngineBusy, JobAdmitted, JobFinished, JobNotFound
from cluster.messages import LatentChunk, Progress
from stages.config import SamplingConfig
from tests.model.engine_fixtures import STEPS, drain, image_latent, make_job, max_diff, run_alone, tiny  # noqa: F401


def test_three_jobs_batched_equal_alone_bitwise(tiny):
    """T2V, I2V and another T2V (different lengths, seeds, prompts) joining at steps 0, 2, 5:
    every chunk equals the job run alone (max abs diff 0 on CPU float32), and each active job
    advances exactly one step per engine step."""
    cfg, dit = tiny
    jobs = [make_job("t2v", 5, seed=1, prompt=1), make_job("i2v", 3, seed=2, prompt=2, prefix=image_latent()),
            make_job("t2v-b", 4, seed=3, prompt=3)]
    alone = [run_alone(Engine(cfg, dit), j) for j in jobs]
    engine = Engine(cfg, dit, max_active_jobs=3)
    batches, progress = [], []
    joins = {0: jobs[0], 2: jobs[1], 5: jobs[2]}

    def on_step(i, eng):
        if i in joins:
            eng.submit(joins[i])

    out = {}
    i = 0
    while True:
        on_step(i, engine)
        if not engine.has_work:
            break
        events = engine.step()
        batches.append(engine.last_step.job_ids)
        progress.append(sorted(e.job_id for e in events if isinstance(e, Progress)))
        for e in events:
            if isinstance(e, LatentChunk):
                out.setdefault(e.job_id, {})[e.index] = e.latent
        i += 1
    for job, ref in zip(jobs, alone):
        assert max_diff(out[job.spec.job_id], ref) == 0.0
    assert batches[0] == ("t2v",) and batches[2] == ("t2v", "i2v") and batches[5] == ("t2v", "i2v", "t2v-b")
    assert all(sorted(b) == p for b, p in zip(batches, progress))  # one step per active job per engine step
    for job in jobs:  # every job ran exactly its total_forwards steps, consecutively (no starvation)
        ran = [n for n, b in enumerate(batches) if job.spec.job_id in b]
        w = cfg.sampling.window_size
        assert len(ran) == STEPS // w * (job.spec.num_chunks + w - 1) and ran == list(range(ran[0], ran[0] + len(ran)))


def test_guidance_branches_in_one_forward_equal_sequential_branches(tiny):
    cfg, dit = tiny
    job = make_job("cfg", 4, seed=9, steps=8)
    batched = Engine(cfg, dit)
    a = run_alone(batched, job)
    b = run_alone(Engine(cfg, dit, batch_cfg=False), job)
    assert max_diff(a, b) == 0.0
    assert batched.last_step.windows >= 1


def test_distilled_model_batches_with_the_self_only_chunk(tiny):
    cfg, dit = tiny
    sp = cfg.sampling.model_dump()
    distill = cfg.model_copy(update={"sampling": SamplingConfig(**{**sp, "cfg_number": 1, "distill": True})})
    jobs = [make_job("d1", 3, seed=1), make_job("d2", 2, seed=2, prompt=4)]
    alone = [run_alone(Engine(distill, dit), j) for j in jobs]
    engine = Engine(distill, dit)
    for j in jobs:
        engine.submit(j)
    out = drain(engine)
    for j, ref in zip(jobs, alone):
        assert max_diff(out[j.spec.job_id], ref) == 0.0


def test_token_budget_splits_the_step_into_forwards_with_the_same_output(tiny):
    cfg, dit = tiny
    jobs = [make_job("x", 3, seed=1), make_job("y", 2, seed=2, prompt=5)]
    one = Engine(cfg, dit)
    split = Engine(cfg, dit, max_forward_tokens=100)  # below one window: every window its own forward
    for j in jobs:
        one.submit(j)
        split.submit(j)
    a, b = drain(one), drain(split)
    for j in ("x", "y"):
        assert max_diff(a[j], b[j]) == 0.0


def test_a_job_with_broken_state_fails_alone(tiny):
    """Fault injection: drop a cached chunk from one job's ring; that job fails with a clear
    error and leaves, the other job of the same steps is unaffected."""
    cfg, dit = tiny
    good_alone = run_alone(Engine(cfg, dit), make_job("good", 4, seed=2, steps=8))
    engine = Engine(cfg, dit)
    engine.submit(make_job("good", 4, seed=2, steps=8))
    bad = engine.submit(make_job("bad", 4, seed=3, steps=8))  # 2 steps per stage: the ring is read
    events, broken = [], False
    while engine.has_work:
        kv = bad._st.ctx.kv
        if not broken and kv is not None and kv.chunks:
            kv.ring.held.clear()  # the K/V a later plan reads are gone
            broken = True
        events += engine.step()
    failed = [e for e in events if isinstance(e, JobFinished) and e.state == "failed"]
    assert [e.job_id for e in failed] == ["bad"] and "not held" in failed[0].error and bad.state == "failed"
    good = {e.index: e.latent for e in events if isinstance(e, LatentChunk) and e.job_id == "good"}
    assert max_diff(good, good_alone) == 0.0
    assert engine.pool.free_blocks == engine.pool.num_blocks and engine.stats().jobs_finished["failed"] == 1


def test_queue_positions_fifo_and_resource_exhausted(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit, max_active_jobs=1, queue_limit=2)
    handles = [engine.submit(make_job(f"q{i}", 1, seed=i)) for i in range(3)]
    assert [h.state for h in handles] == ["active", "queued", "queued"]
    assert [h.queue_position for h in handles] == [None, 0, 1]
    with pytest.raises(EngineBusy) as err:
        engine.submit(make_job("q3", 1, seed=3))
    assert err.value.retry_after_s > 0 and err.value.queued == 2
    finished, admitted = [], []
    while engine.has_work:
        for e in engine.step():
            if isinstance(e, JobFinished):
                finished.append(e.job_id)
            if isinstance(e, JobAdmitted):
                admitted.append(e.job_id)
    assert admitted == ["q0", "q1", "q2"] and finished == ["q0", "q1", "q2"]
    assert all(h.done and h.state == "done" and h.chunks_emitted == 1 for h in handles)
    with pytest.raises(JobNotFound):
        engine.handle("q0")


def test_cancel_leaves_next_step_and_returns_kv_to_pool(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit, max_active_jobs=2, queue_limit=2)
    a = engine.submit(make_job("a", None, seed=1))  # an endless stream
    engine.submit(make_job("b", 6, seed=2))
    c = engine.submit(make_job("c", 1, seed=3))
    for _ in range(3):
        engine.step()
    assert engine.last_step.job_ids == ("a", "b") and c.queue_position == 0
    free_before = engine.pool.free_blocks
    region = a._st.blocks
    assert engine.cancel("a") and a.state == "cancelled"
    assert engine.pool.free_blocks == free_before + region  # KV back in the pool at once
    assert not engine.cancel("a")
    events = engine.step()
    assert engine.last_step.job_ids == ("b", "c")  # a left, the queued job joined
    assert [e.state for e in events if isinstance(e, JobFinished)] == ["cancelled"]
    assert "a" not in {e.job_id for e in events if isinstance(e, (Progress, LatentChunk))}
    engine.cancel("b")
    engine.cancel("c")
    engine.step()
    assert engine.pool.free_blocks == engine.pool.num_blocks and not engine.has_work


def test_stats_count_jobs_pool_steps_and_chunk_timings(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit, max_active_jobs=1, queue_limit=4)
    engine.submit(make_job("s1", 2, seed=1))
    engine.submit(make_job("s2", 1, seed=2))
    s0 = engine.stats()
    assert (s0.active_jobs, s0.queued_jobs, s0.steps) == (1, 1, 0)
    assert [j.state for j in s0.jobs] == ["active", "queued"] and s0.jobs[1].queue_position == 0
    assert 0 < s0.kv_pool_used_bytes < s0.kv_pool_bytes and s0.kv_pool_utilization > 0
    chunks = [e for e in _all_events(engine) if isinstance(e, LatentChunk)]
    s = engine.stats()
    assert s.chunks_produced == 3 == len(chunks) and s.jobs_finished == {"done": 2, "cancelled": 0, "failed": 0}
    assert s.active_jobs == s.queued_jobs == 0 and s.kv_pool_used_bytes == 0
    assert s.step_s.count == s.steps and s.ttfc_s.count == 2 and s.tpoc_s.count == 1
    assert "ttfc_s" in chunks[0].timings and "tpoc_s" in chunks[1].timings and chunks[0].timings["dit_step_s"] > 0


def _all_events(engine):
    events = []
    while engine.has_work:
        events += engine.step()
    return events
