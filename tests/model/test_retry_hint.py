"""The engine's retry hint (EngineBusy.retry_after_s) prices a step by the jobs in the current batch.

Issue 9 point 10: the hint was the all-time mean step time times the remaining steps. After
steps of one job, a full batch of N jobs got a hint N times too short on CPU (a batched step
costs about N single steps there), so refused clients came back too early, again and again.
"""

from __future__ import annotations

import pytest

from cluster.engine import Engine, EngineBusy
from cluster.engine.loop import MIN_RETRY_HINT_S
from tests.model.engine_fixtures import make_job, run_alone, tiny  # noqa: F401


def test_hint_scales_with_the_jobs_in_the_batch(tiny):
    cfg, dit = tiny
    batch = 3
    engine = Engine(cfg, dit, max_active_jobs=batch, queue_limit=0)
    run_alone(engine, make_job("history", 1, seed=0))  # every step so far ran one job
    steps = engine.stats().step_s
    handles = [engine.submit(make_job(f"a{i}", 1, seed=1 + i)) for i in range(batch)]
    with pytest.raises(EngineBusy) as full:
        engine.submit(make_job("late", 1, seed=9))
    one_job_step = steps.sum / steps.count
    assert full.value.active == batch
    assert full.value.retry_after_s == pytest.approx(
        max(MIN_RETRY_HINT_S, one_job_step * batch * handles[0].total_forwards))
