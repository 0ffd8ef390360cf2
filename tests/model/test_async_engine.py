"""The Ray-free async engine (cluster.engine.AsyncEngine) on the magi-tiny DiT: streams, queue
positions, cancels (issue 9 point 4: a cancel the engine accepted always ends the stream
cancelled), early cancels, a failing step loop, bounded stats. No Serve instance."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from cluster.engine import AsyncEngine, Engine, EngineBusy, JobCancelled, JobFailed, JobNotFound
from cluster.messages import LatentChunk, Progress, QueuePosition
from stages.errors import InvalidInput
from tests.model.engine_fixtures import STEPS, caption, make_job, run_alone, tiny  # noqa: F401

RACE_REPETITIONS = 200  # issue 9.4: 17 of 160 tries ended OK with 0 chunks before the fix


def run(coro):
    return asyncio.run(coro)


async def collect(engine: AsyncEngine, job_id: str) -> tuple[list, BaseException | None]:
    """The job's events and the error its stream ended with (None: ended normally)."""
    events = []
    try:
        async for event in engine.events(job_id):
            events.append(event)
    except (JobCancelled, JobFailed) as err:
        return events, err
    return events, None


def test_a_job_streams_the_engines_chunks_and_leaves_stats(tiny):
    cfg, dit = tiny
    job = make_job("a", 2, seed=3)
    expected = run_alone(Engine(cfg, dit), job)

    async def main():
        engine = AsyncEngine(Engine(cfg, dit))
        await engine.submit(job)
        events, err = await collect(engine, "a")
        await engine.close()
        return events, err, engine.stats("a"), engine.active_jobs()

    events, err, stat, active = run(main())
    chunks = {e.index: e.latent for e in events if isinstance(e, LatentChunk)}
    assert err is None and sorted(chunks) == sorted(expected)
    assert all(torch.equal(chunks[c], expected[c]) for c in expected)
    assert isinstance(events[0], Progress) and not any(isinstance(e, QueuePosition) for e in events)
    assert stat.state == "done" and stat.finished_at is not None and active == []
    assert stat.steps == stat.total_forwards == len(stat.step_intervals) and stat.chunks == len(expected)
    assert stat.ttfc_s > 0 and stat.tpoc_s > 0 and stat.kv_bytes == 0


def test_queued_jobs_get_their_position_until_they_start(tiny):
    cfg, dit = tiny
    ids = ["first", "second", "third"]

    async def main():
        engine = AsyncEngine(Engine(cfg, dit, max_active_jobs=1, queue_limit=len(ids)))
        for job_id in ids:
            await engine.submit(make_job(job_id, 1, seed=1))
        streams = await asyncio.gather(*(collect(engine, j) for j in ids))
        await engine.close()
        return streams

    for ahead, (job_id, (events, err)) in enumerate(zip(ids, run(main()))):
        started = next(i for i, e in enumerate(events) if isinstance(e, Progress))
        positions = [e.position for e in events[:started]]
        assert err is None and all(isinstance(e, QueuePosition) and e.job_id == job_id for e in events[:started])
        assert positions == list(range(ahead - 1, -1, -1))  # counts down to 0, then the job starts
        assert not any(isinstance(e, QueuePosition) for e in events[started:])
        assert sum(isinstance(e, LatentChunk) for e in events) == 1


async def _cancel_race(engine: AsyncEngine, job_id: str, delay: int) -> tuple[bool, list, BaseException | None]:
    """Submit and cancel a 1-chunk job: ``delay`` 0 = cancel while the submit is in flight,
    else ``delay - 1`` event-loop turns after the submit returned (the step loop runs meanwhile)."""
    submit = asyncio.ensure_future(engine.submit(make_job(job_id, 1, seed=2, steps=STEPS)))
    await asyncio.sleep(0)  # the submit runs up to its call in the compute thread
    if delay:
        await submit
    for _ in range(max(delay - 1, 0)):
        await asyncio.sleep(0)
    held = await engine.cancel(job_id)
    await submit
    events, err = await collect(engine, job_id)
    return held, events, err


def test_a_cancel_the_engine_accepted_always_ends_the_stream_cancelled(tiny):
    """Issue 9.4: submit (1 chunk, 4 steps), then cancel at once; repeated with the cancel landing
    during the submit and after 0..3 event-loop turns (the step loop running meanwhile)."""
    cfg, dit = tiny

    async def main():
        engine = AsyncEngine(Engine(cfg, dit))
        outcomes = [await _cancel_race(engine, f"race-{i}", i % 5) for i in range(RACE_REPETITIONS)]
        stats = [engine.stats(f"race-{i}") for i in range(RACE_REPETITIONS)]
        await engine.close()
        return outcomes, stats

    outcomes, stats = run(main())
    for (held, events, err), stat in zip(outcomes, stats):
        assert held, "the cancel came right after the submit: the engine held the job"
        assert isinstance(err, JobCancelled), (events, err, stat)
        assert stat.state == "cancelled" and not any(isinstance(e, LatentChunk) for e in events)


def test_a_cancel_before_the_job_comes_refuses_it(tiny):
    cfg, dit = tiny

    async def main():
        engine = AsyncEngine(Engine(cfg, dit))
        held = await engine.cancel("early")
        with pytest.raises(JobCancelled):
            await engine.submit(make_job("early", 1, seed=1))
        events, err = await collect(engine, "early")
        await engine.submit(make_job("early", 1, seed=1))  # the cancel is used up: the id runs again
        again = await collect(engine, "early")
        await engine.close()
        return held, events, err, again

    held, events, err, (again, again_err) = run(main())
    assert held is False and events == [] and isinstance(err, JobCancelled)
    assert again_err is None and sum(isinstance(e, LatentChunk) for e in again) == 1


def test_leaving_the_stream_cancels_the_job_and_frees_its_kv(tiny):
    cfg, dit = tiny

    async def main():
        engine = AsyncEngine(Engine(cfg, dit))
        await engine.submit(make_job("endless", None, seed=1))
        stream = engine.events("endless")
        async for event in stream:
            if isinstance(event, LatentChunk):
                break
        await stream.aclose()
        while engine.stats("endless").finished_at is None:
            await asyncio.sleep(0.01)
        counters = await engine.engine_stats()
        await engine.close()
        return engine.stats("endless"), counters

    stat, counters = run(main())
    assert stat.state == "cancelled" and stat.total_forwards is None and stat.chunks >= 1
    assert counters.kv_pool_used_bytes == 0 and counters.active_jobs == 0 and counters.jobs_finished["cancelled"] == 1


def test_a_failing_step_loop_fails_every_waiting_stream_and_recovers(tiny):
    """A bug inside the step loop (here: the step observer raises once) ends every queued and
    running job's stream with JobFailed instead of leaving it waiting; later jobs run."""
    cfg, dit = tiny
    broken = [True]

    def observer(stats, step_s, events):
        if broken.pop() if broken else False:
            raise ZeroDivisionError("observer bug")

    async def main():
        engine = AsyncEngine(Engine(cfg, dit, max_active_jobs=1, queue_limit=1), on_step=observer)
        for job_id in ("running", "waiting"):
            await engine.submit(make_job(job_id, 2, seed=1))
        failed = await asyncio.gather(collect(engine, "running"), collect(engine, "waiting"))
        while (await engine.engine_stats()).active_jobs or (await engine.engine_stats()).queued_jobs:
            await asyncio.sleep(0.01)  # the failed jobs are cancelled in the engine too
        await engine.submit(make_job("later", 1, seed=1))
        later = await collect(engine, "later")
        await engine.close()
        return failed, later

    failed, (later, later_err) = run(main())
    for _events, err in failed:
        assert isinstance(err, JobFailed) and "ZeroDivisionError" in str(err)
        assert pickle.loads(pickle.dumps(err)).job_id == err.job_id
    assert later_err is None and sum(isinstance(e, LatentChunk) for e in later) == 1


def test_refusals_leave_no_record(tiny):
    cfg, dit = tiny

    async def main():
        engine = AsyncEngine(Engine(cfg, dit, max_active_jobs=1, queue_limit=0))
        await engine.submit(make_job("kept", 3, seed=1))
        with pytest.raises(InvalidInput) as dup:
            await engine.submit(make_job("kept", 1, seed=1))
        with pytest.raises(EngineBusy) as busy:
            await engine.submit(make_job("refused", 1, seed=1))
        with pytest.raises(JobNotFound):
            await engine.update_prompt("refused", 1, caption(2))
        with pytest.raises(JobNotFound):
            [e async for e in engine.events("refused")]
        assert await engine.cancel("kept") is True
        await collect(engine, "kept")
        await engine.close()
        return dup.value, busy.value, engine.stats("refused")

    dup, busy, refused = run(main())
    assert dup.field == "job_id" and refused is None
    again = pickle.loads(pickle.dumps(busy))
    assert isinstance(again, EngineBusy) and str(again) == str(busy) and again.retry_after_s == busy.retry_after_s


def test_finished_job_stats_are_bounded(tiny):
    cfg, dit = tiny
    history = 3
    ids = [f"old-{i}" for i in range(history + 2)]

    async def main():
        engine = AsyncEngine(Engine(cfg, dit), history=history)
        for job_id in ids:  # each refused by an early cancel: a finished record, no model work
            await engine.cancel(job_id)
            with pytest.raises(JobCancelled):
                await engine.submit(make_job(job_id, 1, seed=1))
        await engine.close()
        return [engine.stats(j) for j in ids]

    stats = run(main())
    assert [s is not None for s in stats] == [False] * (len(ids) - history) + [True] * history
    assert all(s.state == "cancelled" and s.steps == 0 for s in stats[-history:])
