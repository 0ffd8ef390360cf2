"""The three parts of one engine step (plan, execute, update; DESIGN.md section 2), as
functions over the jobs of the step (plain Python). :meth:`cluster.engine.loop.Engine.step`
admits waiting jobs, then calls them in order; ``finish(st, state, error=None)`` is the
engine's way to end a job (gives back its KV region, returns its ``JobFinished``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from cluster.engine.events import job_events
from cluster.scheduler.step_plan import EngineStepPlan, JobPlan, plan_step, update_job

if TYPE_CHECKING:  # pragma: no cover
    from cluster.engine.counters import EngineCounters
    from cluster.engine.prepare import JobState
    from cluster.engine.runner import BatchRunner
    from cluster.messages import JobFinished

    Finish = Callable[..., JobFinished]

log = logging.getLogger(__name__)


def plan_jobs(runnable: list[JobState], rope_horizon_chunks: int | None, finish: Finish, events: list) -> EngineStepPlan:
    """plan: the scheduler's step plan over the ``runnable`` jobs (active, not paused;
    :func:`cluster.scheduler.step_plan.plan_step`); the jobs that leave without running
    (finished, or their KV state cannot serve the next window) are finished, their events
    appended to ``events``."""
    plan = plan_step([(st.job_id, st.sched, st.ctx.kv.ring) for st in runnable], rope_horizon_chunks)
    by_id = {st.job_id: st for st in runnable}
    for job_id in plan.finished:
        st = by_id[job_id]
        events.append(finish(st, "cancelled" if st.sched.cancelled else "done"))
    for job_id, err in plan.failed:
        events.append(finish(by_id[job_id], "failed", f"{type(err).__name__}: {err}"))
    return plan


def run_forward(runner: BatchRunner, items: list[tuple[JobState, JobPlan]], counters: EngineCounters
                ) -> tuple[list, float]:
    """execute: every planned job in one packed forward (:class:`cluster.engine.runner.BatchRunner`);
    per job its outcome or the exception that failed it (a failing forward fails them all),
    and the step's seconds (recorded in ``counters``)."""
    started = time.perf_counter()
    try:
        outcomes = runner.run([(st.ctx, jp) for st, jp in items])
    except Exception as err:  # noqa: BLE001 - the replica survives; the step's jobs fail
        log.exception("engine step failed")
        outcomes = [err] * len(items)
    dt = time.perf_counter() - started
    counters.record_step(tuple(st.job_id for st, _ in items), outcomes, dt)
    return outcomes, dt


def update_jobs(items: list[tuple[JobState, JobPlan]], outcomes: list, dt: float, counters: EngineCounters,
                finish: Finish, events: list) -> None:
    """update: per job the scheduler and KV ring move on
    (:func:`cluster.scheduler.step_plan.update_job`); its events, then a ``JobFinished`` if it
    ended, are appended to ``events`` (job by job, in ``items`` order)."""
    for (st, jp), out in zip(items, outcomes):
        if isinstance(out, BaseException):
            events.append(finish(st, "failed", f"{type(out).__name__}: {out}"))
            continue
        update_job(st.sched, st.ctx.kv.ring, jp, out.emitted)
        job_ev = job_events(st, jp.window, out, dt)
        counters.observe(job_ev)
        events.extend(job_ev)
        if st.sched.done:
            events.append(finish(st, "done"))
