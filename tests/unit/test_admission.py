"""Engine admission (bounded active set + bounded FIFO queue) and the stats objects, without a model."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.engine.admission import Admission
from cluster.engine.errors import EngineBusy, JobNotFound
from cluster.engine.stats import Histogram, JobTimings


class Pool:
    """Stand-in resource counter with the allocate() contract (units per job)."""

    def __init__(self, units: int):
        self.free = units
        self.held: dict[str, int] = {}

    def allocate(self, job) -> bool:
        name, need = job
        if need > self.free:
            return False
        self.free -= need
        self.held[name] = need
        return True

    def release(self, name: str) -> None:
        self.free += self.held.pop(name)


def test_admits_until_full_then_queues_fifo_with_positions():
    pool = Pool(10)
    adm = Admission(max_active=2, queue_limit=3, allocate=pool.allocate)
    assert adm.offer("a", ("a", 3)) and adm.offer("b", ("b", 3))
    assert not adm.offer("c", ("c", 3))  # active set full
    assert not adm.offer("d", ("d", 1))
    assert [j[0] for j in adm.active] == ["a", "b"] and [j[0] for j in adm.queued] == ["c", "d"]
    assert adm.position("c") == 0 and adm.position("d") == 1 and adm.position("a") is None
    assert adm.admit() == []  # still full
    adm.remove("a")
    pool.release("a")
    assert [j[0] for j in adm.admit()] == ["c"]
    assert adm.position("d") == 0 and "c" in adm and adm.get("c") == ("c", 3)


def test_queue_bound_raises_engine_busy_with_retry_hint():
    adm = Admission(max_active=1, queue_limit=1, allocate=lambda job: True, retry_hint=lambda: 12.5)
    adm.offer("a", "a")
    adm.offer("b", "b")
    with pytest.raises(EngineBusy) as err:
        adm.offer("c", "c")
    assert err.value.retry_after_s == 12.5 and err.value.queue_limit == 1
    assert "retry in about 12.5 s" in str(err.value) and "c" not in adm
    again = pickle.loads(pickle.dumps(err.value))  # crosses Ray to the ingress
    assert isinstance(again, EngineBusy) and again.retry_after_s == 12.5 and str(again) == str(err.value)
    assert pickle.loads(pickle.dumps(JobNotFound("j"))).job_id == "j"
    with pytest.raises(ValueError, match="already queued or running"):
        adm.offer("a", "a")


def test_head_of_line_is_not_overtaken_by_smaller_jobs():
    """Strict FIFO: a big job waiting for resources is not starved by small ones behind it."""
    pool = Pool(4)
    adm = Admission(max_active=4, queue_limit=4, allocate=pool.allocate)
    adm.offer("small1", ("small1", 2))
    assert not adm.offer("big", ("big", 4))
    assert not adm.offer("small2", ("small2", 1))  # would fit, but big is ahead of it
    assert adm.admit() == []
    adm.remove("small1")
    pool.release("small1")
    assert [j[0] for j in adm.admit()] == ["big"]
    assert adm.position("small2") == 0


def test_resource_refusal_queues_even_with_free_active_places():
    pool = Pool(2)
    adm = Admission(max_active=3, queue_limit=2, allocate=pool.allocate)
    assert adm.offer("a", ("a", 2))
    assert not adm.offer("b", ("b", 2))  # active places left, no resources
    assert adm.remove("nobody") is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=12), st.integers(1, 3), st.integers(4, 8))
def test_every_job_is_admitted_in_submission_order(needs, max_active, units):
    """No starvation: finishing the oldest active job repeatedly admits every job, in FIFO order."""
    pool = Pool(units)
    adm = Admission(max_active=max_active, queue_limit=len(needs), allocate=pool.allocate)
    order = []
    for i, need in enumerate(needs):
        if adm.offer(i, (i, need)):
            order.append(i)
    while adm.active:
        done = adm.active[0][0]
        adm.remove(done)
        pool.release(done)
        order += [j[0] for j in adm.admit()]
        assert len(adm.active) <= max_active
    assert order == list(range(len(needs))) and not adm.queued


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_active"):
        Admission(0, 1, allocate=lambda j: True)
    with pytest.raises(ValueError, match="queue_limit"):
        Admission(1, -1, allocate=lambda j: True)
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
