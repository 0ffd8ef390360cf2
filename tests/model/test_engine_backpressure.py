"""Backpressure in the engine (issue 9 point 11), without Ray: a job whose reader stops taking
chunks is paused after ``engine.max_buffered_chunks`` (it keeps its KV region, sits out the
steps), other jobs keep stepping, it resumes when read and its chunks are bitwise those of an
unpaused run; a job paused past ``engine.paused_timeout_s`` is cancelled."""

from __future__ import annotations

import asyncio

import torch

from cluster.config import EngineSettings
from cluster.engine import AsyncEngine, Engine, JobCancelled
from cluster.messages import LatentChunk
from tests.model.engine_fixtures import drain, make_job, run_alone, tiny  # noqa: F401

SETTINGS = EngineSettings()  # the defaults the service runs with
SLOW_CHUNKS = SETTINGS.max_buffered_chunks + 3  # enough to pause, then more to produce after it
FAST_CHUNKS = SETTINGS.max_buffered_chunks + 2


async def _read_all(engine: AsyncEngine, job_id: str) -> dict[int, torch.Tensor]:
    return {e.index: e.latent async for e in engine.events(job_id) if isinstance(e, LatentChunk)}


async def _wait_for(predicate, what: str, polls: int = 2000) -> None:
    for _ in range(polls):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_a_job_whose_reader_stalls_is_paused_others_go_on_and_it_resumes_bitwise(tiny):
    cfg, dit = tiny
    slow, fast = make_job("slow", SLOW_CHUNKS, seed=5), make_job("fast", FAST_CHUNKS, seed=6)
    expected = run_alone(Engine(cfg, dit), slow)
    bound = SETTINGS.max_buffered_chunks

    async def main():
        engine = AsyncEngine(Engine(cfg, dit, max_active_jobs=2), max_buffered_chunks=bound)
        await engine.submit(slow)
        await engine.submit(fast)
        await _wait_for(lambda: engine.stats("slow").paused, "slow job paused")
        fast_chunks = await _read_all(engine, "fast")  # runs to its end while "slow" is not read
        at_fast_end, engine_stats = engine.stats("slow"), await engine.engine_stats()
        slow_chunks = await _read_all(engine, "slow")
        await engine.close()
        return at_fast_end, engine_stats, engine.stats("fast"), fast_chunks, engine.stats("slow"), slow_chunks

    at_fast_end, engine_stats, fast_stat, fast_chunks, slow_stat, slow_chunks = asyncio.run(main())
    assert at_fast_end.paused and at_fast_end.state == "active" and at_fast_end.kv_bytes > 0
    assert at_fast_end.chunks == bound  # one clean chunk per job per step at most
    assert at_fast_end.steps < fast_stat.steps == fast_stat.total_forwards  # fast went on alone
    assert fast_stat.state == "done" and len(fast_chunks) == FAST_CHUNKS
    assert engine_stats.paused_jobs == 1 and [j.paused for j in engine_stats.jobs] == [True]
    assert slow_stat.state == "done" and not slow_stat.paused and slow_stat.pauses >= 1
    assert sorted(slow_chunks) == sorted(expected)
    assert all(torch.equal(slow_chunks[c], expected[c]) for c in expected)


def test_a_job_paused_past_the_timeout_is_cancelled_and_frees_its_kv(tiny):
    cfg, dit = tiny
    settings = EngineSettings(paused_timeout_s=0.2)  # short, so the test does not wait long
    job = make_job("never-read", SLOW_CHUNKS, seed=2)

    async def main():
        engine = AsyncEngine(Engine(cfg, dit), max_buffered_chunks=settings.max_buffered_chunks,
                             paused_timeout_s=settings.paused_timeout_s)
        await engine.submit(job)
        await _wait_for(lambda: engine.stats("never-read").state == "cancelled", "paused job cancelled")
        got, err = [], None
        try:
            async for event in engine.events("never-read"):
                got.append(event)
        except JobCancelled as exc:
            err = exc
        stats = await engine.engine_stats()
        await engine.close()
        return engine.stats("never-read"), got, err, stats

    stat, got, err, stats = asyncio.run(main())
    assert isinstance(err, JobCancelled) and stat.pauses == 1 and not stat.paused
    assert sum(isinstance(e, LatentChunk) for e in got) == settings.max_buffered_chunks  # what was buffered
    assert stats.active_jobs == 0 and stats.kv_pool_used_bytes == 0 and stats.paused_jobs == 0


def test_engine_pause_resume_leaves_a_job_out_of_the_steps(tiny):
    cfg, dit = tiny
    a, b = make_job("a", 2, seed=1), make_job("b", 2, seed=2)
    expected = {"a": run_alone(Engine(cfg, dit), a), "b": run_alone(Engine(cfg, dit), b)}
    engine = Engine(cfg, dit, max_active_jobs=1, queue_limit=1)
    engine.submit(a)
    engine.submit(b)
    assert not engine.pause("b") and not engine.resume("a")  # queued / not paused: refused
    assert engine.pause("a")
    assert [type(e).__name__ for e in engine.step()] == ["JobAdmitted"]  # from the submit; no forward
    assert not engine.has_work and engine.stats().paused_jobs == 1  # nothing can step until "a" resumes
    assert [j.paused for j in engine.stats().jobs] == [True, False] and engine.stats().steps == 0
    assert engine.resume("a") and engine.has_work
    out = drain(engine)
    assert all(torch.equal(out[j][c], expected[j][c]) for j in expected for c in expected[j])
    assert not engine.pause("a") and engine.stats().paused_jobs == 0
