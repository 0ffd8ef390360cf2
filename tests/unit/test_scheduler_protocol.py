"""ChunkScheduler's plan -> update protocol, cancellation, validation and import boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.scheduler.chunk_scheduler import ChunkScheduler, SchedulerProtocolError
from cluster.scheduler.plan import StepResult
from stages.errors import InvalidInput

REPO = Path(__file__).resolve().parents[2]


def _sched(**kw) -> ChunkScheduler:
    steps = kw.pop("num_steps", 8)
    args = dict(num_chunks=3, window_size=2, num_steps=steps,
                t_schedule=[k / steps for k in range(steps + 1)], distill_intervals=[1.0] * steps)
    args.update(kw)
    return ChunkScheduler(**args)


def test_next_plan_twice_without_update_raises():
    s = _sched()
    plan = s.next_plan()
    with pytest.raises(SchedulerProtocolError, match="before update"):
        s.next_plan()
    s.update(StepResult(plan.global_step, plan.emits))
    assert s.next_plan().global_step == 1


def test_update_without_plan_or_with_wrong_result_raises():
    s = _sched()
    with pytest.raises(SchedulerProtocolError, match="without an outstanding plan"):
        s.update(StepResult(0, ()))
    plan = s.next_plan()
    with pytest.raises(SchedulerProtocolError, match="global_step"):
        s.update(StepResult(plan.global_step + 1, ()))
    with pytest.raises(SchedulerProtocolError, match="emitted"):
        s.update(StepResult(plan.global_step, (0,)))
    s.update(StepResult(plan.global_step, plan.emits))  # still outstanding after the rejected results
    assert s.steps_done == 1


def test_finite_job_finishes_and_reports_progress():
    s = _sched()
    assert s.total_forwards == 4 * (3 + 2 - 1) and not s.done
    n = 0
    while (plan := s.next_plan()) is not None:
        s.update(StepResult(plan.global_step, plan.emits))
        n += 1
    assert n == s.total_forwards == s.steps_done
    assert s.done and s.emitted == (0, 1, 2)
    assert s.next_plan() is None


def test_cancel_stops_an_endless_stream():
    s = _sched(num_chunks=None)
    assert s.total_forwards is None
    for _ in range(100):
        plan = s.next_plan()
        s.update(StepResult(plan.global_step, plan.emits))
    assert not s.done and len(s.emitted) == (100 - 8) // 4 + 1  # chunk 0 after step 7, then every per=4
    plan = s.next_plan()
    s.cancel()
    assert s.done and s.cancelled and s.next_plan() is None
    s.update(StepResult(plan.global_step, plan.emits))  # the in-flight plan may still be reported
    assert s.next_plan() is None


def test_prefix_extraction_comes_first_with_step_zero():
    s = _sched(num_chunks=4, chunk_offset=2)
    first = s.next_plan()
    assert first.is_prefix_extraction and first.global_step == 0 and first.stagger_index == -1
    s.update(StepResult(0, ()))
    second = s.next_plan()
    assert not second.is_prefix_extraction and second.global_step == 0
    assert [sl.chunk for sl in second.slots] == [2] and second.slice_point == 2


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(num_steps=6, window_size=4), "num_steps"),
        (dict(num_steps=6, window_size=2), "noise2clean_kvrange"),  # 6 steps, 4 ranges
        (dict(window_size=0), "window_size"),
        (dict(num_chunks=2, chunk_offset=2), "num_chunks"),
        (dict(num_chunks=0), "num_chunks"),
        (dict(chunk_offset=-1), "chunk_offset"),
        (dict(t_schedule=[0.0, 1.0]), "t_schedule"),
        (dict(distill_intervals=[1.0]), "distill_intervals"),
        (dict(noise2clean_kvrange=(5, 0)), "noise2clean_kvrange"),
        (dict(clean_chunk_kvrange=0), "clean_chunk_kvrange"),
    ],
)
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(InvalidInput) as err:
        _sched(**kw)
    assert err.value.field == field


def test_full_causal_when_noise2clean_kvrange_is_empty():
    s = _sched(num_chunks=4, noise2clean_kvrange=())  # reference generate_default_kvrange
    plans = []
    while (plan := s.next_plan()) is not None:
        plans.append(plan)
        s.update(StepResult(plan.global_step, plan.emits))
    assert all(sl.kv_range == (0, sl.chunk + 1) for p in plans for sl in p.slots)
    assert all(p.kv_keep_from == 0 for p in plans)


def test_scheduler_package_never_imports_torch_or_numpy():
    code = (
        "import sys, cluster.scheduler.chunk_scheduler, cluster.scheduler.chunks, cluster.scheduler.stagger;"
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad"
    )
    env_path = f"{REPO}:{REPO / 'proto'}"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PYTHONPATH": env_path},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
