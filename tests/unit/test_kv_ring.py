"""The scheduler's step plan and KV ring (cluster.scheduler.step_plan / kv_ring), plain Python:
an endless job walked by plan -> update keeps every read chunk held inside its history area,
re-bases (moves go down), and keeps RoPE positions under the horizon."""

from __future__ import annotations

import pytest

from cluster.scheduler.chunk_scheduler import ChunkScheduler
from cluster.scheduler.kv_areas import kv_areas
from cluster.scheduler.kv_ring import KVRing
from cluster.scheduler.step_plan import plan_step, update_job
from stages.config import SamplingConfig
from stages.sampling import init_intervals, init_t

SP = SamplingConfig()


def _job(num_chunks=None, sp: SamplingConfig = SP) -> tuple[ChunkScheduler, KVRing]:
    n = sp.num_steps
    sched = ChunkScheduler(num_chunks=num_chunks, window_size=sp.window_size, num_steps=n,
                           t_schedule=init_t(n).tolist(), distill_intervals=init_intervals(n),
                           noise2clean_kvrange=sp.noise2clean_kvrange, clean_chunk_kvrange=sp.clean_chunk_kvrange,
                           clean_t=sp.clean_t)
    return sched, KVRing(kv_areas(sched.spec, sp.cfg_number))


@pytest.mark.parametrize("horizon", [None, SP.window_size + max(SP.noise2clean_kvrange)])
def test_endless_walk_reads_only_held_chunks_inside_the_history_area(horizon):
    sched, ring = _job()
    steps = sched.spec.per * 6 * ring.areas.history
    for _ in range(steps):
        plan = plan_step([("job", sched, ring)], horizon)
        assert not plan.failed and not plan.finished and len(plan.jobs) == 1
        jp = plan.jobs[0]
        win = jp.window
        for s in win.slots:
            lo, hi = s.kv_range
            assert set(range(lo, min(hi, win.slots[0].chunk))) <= set(ring.held)
            for a, b in ring.history_ranges(s.kv_range):
                assert 0 <= a < b <= ring.areas.history
        assert all(0 <= m.dst < m.src < ring.areas.history for m in jp.kv_moves)
        if horizon is not None:
            assert win.slots[-1].chunk + 1 - jp.rope_base <= horizon
        update_job(sched, ring, jp, win.emits)
    assert ring.base > 0 and len(ring.held) < ring.areas.history  # re-based, bounded ring
    assert (ring.rope_base > 0) == (horizon is not None)


def test_a_job_whose_read_chunks_are_gone_fails_alone_in_the_plan():
    jobs = {"a": _job(), "b": _job()}

    def step():
        plan = plan_step([(j, *jobs[j]) for j in jobs], None)
        for jp in plan.jobs:
            update_job(*jobs[jp.job_id], jp, jp.window.emits)
        return plan

    while not jobs["a"][1].held:  # the ring holds a clean chunk the next window reads
        assert not step().failed
    jobs["a"][1].held.clear()  # the K/V a later plan reads are gone
    plan = step()
    assert [j.job_id for j in plan.jobs] == ["b"] and [f[0] for f in plan.failed] == ["a"]
    assert "not held" in str(plan.failed[0][1])


def test_finished_job_leaves_and_a_snapshot_that_does_not_fit_is_refused():
    sched, ring = _job(num_chunks=1)
    while not sched.done:
        jp = plan_step([("job", sched, ring)], None).jobs[0]
        update_job(sched, ring, jp, jp.window.emits)
    assert plan_step([("job", sched, ring)], None).finished == ("job",)
    _, ring2 = _job()
    with pytest.raises(ValueError, match="do not fit"):
        ring2.load(list(range(ring2.areas.history + 1)))
    ring2.load([3, 4])
    assert ring2.base == 3 and ring2.held == [3, 4]
