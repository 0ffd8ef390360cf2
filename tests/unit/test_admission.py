"""Admission (bounded active set + bounded queue, replaceable policy; cluster.scheduler.admission) and the stats objects, without a model."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.scheduler.admission import Admission, FifoPolicy, QueueFull
from cluster.engine.errors import EngineBusy, JobNotFound
from cluster.engine.stats import Histogram, JobTimings


class Blocks:
    """A block counter with the allocator contract (alloc(n) -> region or None, release(region))."""

    def __init__(self, units: int):
        self.free = units

    def alloc(self, blocks: int):
        if blocks > self.free:
            return None
        self.free -= blocks
        return ("region", blocks)

    def release(self, region) -> None:
        self.free += region[1]


def _offer(adm: Admission, name, need: int) -> bool:
    return adm.offer(name, name, need)


def test_admits_until_full_then_queues_fifo_with_positions():
    pool = Blocks(10)
    adm = Admission(max_active=2, queue_limit=3, blocks=pool)
    assert _offer(adm, "a", 3) and _offer(adm, "b", 3)
    assert adm.region("a") == ("region", 3) and pool.free == 4
    assert not _offer(adm, "c", 3)  # active set full
    assert not _offer(adm, "d", 1)
    assert adm.active == ["a", "b"] and adm.queued == ["c", "d"] and adm.region("c") is None
    assert adm.position("c") == 0 and adm.position("d") == 1 and adm.position("a") is None
    assert adm.admit() == []  # still full
    adm.remove("a")  # gives its region back
    assert pool.free == 7 and adm.region("a") is None
    assert adm.admit() == ["c"]
    assert adm.position("d") == 0 and "c" in adm and adm.get("c") == "c" and pool.free == 4


def test_full_queue_raises_queue_full_and_the_engine_error_crosses_ray():
    adm = Admission(max_active=1, queue_limit=1, blocks=Blocks(100))
    _offer(adm, "a", 1)
    _offer(adm, "b", 1)
    with pytest.raises(QueueFull) as err:
        _offer(adm, "c", 1)
    assert (err.value.queue_limit, err.value.active, err.value.queued) == (1, 1, 1) and "c" not in adm
    busy = EngineBusy(queue_limit=1, active=1, queued=1, retry_after_s=12.5)
    assert "retry in about 12.5 s" in str(busy)
    again = pickle.loads(pickle.dumps(busy))  # crosses Ray to the ingress
    assert isinstance(again, EngineBusy) and again.retry_after_s == 12.5 and str(again) == str(busy)
    assert pickle.loads(pickle.dumps(JobNotFound("j"))).job_id == "j"
    with pytest.raises(ValueError, match="already queued or running"):
        _offer(adm, "a", 1)


def test_head_of_line_is_not_overtaken_by_smaller_jobs():
    """Strict FIFO: a big job waiting for resources is not starved by small ones behind it."""
    pool = Blocks(4)
    adm = Admission(max_active=4, queue_limit=4, blocks=pool)
    _offer(adm, "small1", 2)
    assert not _offer(adm, "big", 4)
    assert not _offer(adm, "small2", 1)  # would fit, but big is ahead of it
    assert adm.admit() == []
    adm.remove("small1")
    assert adm.admit() == ["big"]
    assert adm.position("small2") == 0


class SmallestFirst:
    """A replacement policy: the waiting job with the smallest demand (ties: oldest)."""

    def pick(self, waiting):
        return min(waiting, key=lambda w: (w.blocks, w.seq), default=None)


def test_the_policy_is_replaceable():
    adm = Admission(max_active=4, queue_limit=4, blocks=Blocks(4), policy=SmallestFirst())
    _offer(adm, "small1", 2)
    assert not _offer(adm, "big", 4) and not _offer(adm, "small2", 1)
    assert adm.admit() == ["small2"]  # overtakes big under this policy
    assert isinstance(Admission(1, 0, Blocks(1)).policy, FifoPolicy)


def test_resource_refusal_queues_even_with_free_active_places():
    adm = Admission(max_active=3, queue_limit=2, blocks=Blocks(2))
    assert _offer(adm, "a", 2)
    assert not _offer(adm, "b", 2)  # active places left, no resources
    assert adm.remove("nobody") is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=12), st.integers(1, 3), st.integers(4, 8))
def test_every_job_is_admitted_in_submission_order(needs, max_active, units):
    """No starvation: finishing the oldest active job repeatedly admits every job, in FIFO order;
    every region goes back to the allocator."""
    pool = Blocks(units)
    adm = Admission(max_active=max_active, queue_limit=len(needs), blocks=pool)
    order = []
    for i, need in enumerate(needs):
        if _offer(adm, i, need):
            order.append(i)
    while adm.active:
        adm.remove(adm.active[0])
        order += adm.admit()
        assert len(adm.active) <= max_active
    assert order == list(range(len(needs))) and not adm.queued and pool.free == units


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_active"):
        Admission(0, 1, Blocks(1))
    with pytest.raises(ValueError, match="queue_limit"):
        Admission(1, -1, Blocks(1))
    assert "no queued or running job 'x'" in str(JobNotFound("x"))


def test_histogram_is_cumulative_and_job_timings_give_ttfc_tpoc():
    h = Histogram(buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap.counts == (1, 3) and snap.count == 4 and snap.sum == pytest.approx(4.25)
    t = JobTimings(submitted=10.0)
    assert t.chunk(12.0) == {"ttfc_s": 2.0} and t.tpoc_s is None
    assert t.chunk(12.5) == {"tpoc_s": 0.5}
    assert t.chunk(13.5) == {"tpoc_s": 1.0}
    assert t.ttfc_s == 2.0 and t.tpoc_s == pytest.approx(0.75) and t.chunks == 3
