"""Retry hints of a full engine (cluster.serve.retry): each refused client gets its own place."""

from __future__ import annotations

import random

import pytest
from google.rpc import code_pb2, error_details_pb2
from hypothesis import given
from hypothesis import strategies as st

from cluster.serve.retry import RetryPacer, spread_delay, status_with_retry

hints = st.floats(0.1, 120.0)


@given(hint=hints, place=st.integers(0, 200), slots=st.integers(1, 16), jitter=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**32))
def test_a_place_gets_its_own_interval(hint, place, slots, jitter, seed):
    delay = spread_delay(hint, place, slots, random.Random(seed), jitter)
    interval = hint / slots
    assert hint + place * interval <= delay <= hint + (place + 1) * interval + 1e-9


@given(hint=hints, slots=st.integers(1, 8), clients=st.integers(2, 64), seed=st.integers(0, 2**32))
def test_clients_refused_together_come_back_one_per_interval(hint, slots, clients, seed):
    """The storm of issue 9 point 10: every refused client told the same delay. Paced, the
    retries of clients refused at one instant land one per admission interval."""
    margin = 0.2
    pacer = RetryPacer(slots, margin=margin, seed=seed, clock=lambda: 0.0)
    delays = [pacer.delay(hint) for _ in range(clients)]
    first = hint * (1 + margin)  # the engine's estimate, stretched
    interval = first / slots
    slots_hit = [int((d - first) / interval * (1 - 1e-12)) for d in delays]
    assert slots_hit == list(range(clients))


@given(hint=hints, slots=st.integers(1, 8), seed=st.integers(0, 2**32))
def test_jitter_spreads_clients_of_one_place(hint, slots, seed):
    rng = random.Random(seed)
    spread = {spread_delay(hint, 0, slots, rng) for _ in range(16)}
    flat = {spread_delay(hint, 0, slots, rng, jitter=0.0) for _ in range(16)}
    assert len(spread) > 1 and flat == {hint}


def test_a_place_is_free_again_once_its_retry_time_passed():
    now = [0.0]
    hint, slots, clients = 2.0, 2, 6
    pacer = RetryPacer(slots, margin=0.0, seed=0, clock=lambda: now[0])
    delays = [pacer.delay(hint) for _ in range(clients)]
    now[0] = max(delays)  # every client told so far has retried
    assert pacer.delay(hint) < hint + hint / slots


@pytest.mark.parametrize("bad", [dict(slots=0), dict(place=-1), dict(jitter=1.5)])
def test_bad_arguments_are_refused(bad):
    args = dict(retry_after_s=1.0, place=0, slots=1, rng=random.Random(0)) | bad
    with pytest.raises(ValueError):
        spread_delay(**args)


@given(delay=st.floats(0.0, 3600.0))
def test_status_carries_retry_info(delay):
    status = status_with_retry("DiT engine at capacity", delay)
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    (detail,) = status.details
    info = error_details_pb2.RetryInfo()
    assert detail.Unpack(info)
    assert info.retry_delay.ToNanoseconds() == round(delay * 1e9)
