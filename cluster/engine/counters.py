"""The engine's counters and the figures derived from them (plain Python): steps, chunks, jobs
finished by outcome, step / TTFC / TPOC histograms, the last step, the queue-full retry hint
(:meth:`EngineCounters.retry_hint`) and the :class:`cluster.engine.stats.EngineStats` snapshot
(:func:`engine_stats`). Used by :class:`cluster.engine.loop.Engine` from its one thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection

from cluster.engine.events import StepInfo
from cluster.engine.runner import StepOutcome
from cluster.engine.stats import EngineStats, Histogram, JobStat
from cluster.messages import LatentChunk

if TYPE_CHECKING:  # pragma: no cover
    from cluster.engine.prepare import JobState
    from cluster.scheduler.admission import Admission

MIN_RETRY_HINT_S = 0.1  # the retry hint's floor (seconds)


class EngineCounters:
    """What the engine counted so far. ``last_step``: the last forward's :class:`StepInfo`."""

    def __init__(self):
        self.steps, self.chunks = 0, 0
        self.job_steps = 0  # sum over steps of the jobs in each (for the retry hint)
        self.finished = {"done": 0, "cancelled": 0, "failed": 0}
        self.step_h, self.ttfc_h, self.tpoc_h = Histogram(), Histogram(), Histogram()
        self.last_step: StepInfo | None = None

    def record_step(self, job_ids: tuple[str, ...], outcomes: list, dt: float) -> None:
        """One step ran ``job_ids`` in ``dt`` seconds; ``outcomes``: a StepOutcome or exception per job."""
        ok = [o for o in outcomes if isinstance(o, StepOutcome)]
        self.last_step = StepInfo(self.steps, dt, job_ids, sum(len(o.windows) for o in ok), sum(o.tokens for o in ok))
        self.steps += 1
        self.job_steps += len(job_ids)
        self.step_h.observe(dt)

    def observe(self, events: list) -> None:
        """Count the clean chunks among a job's step events and their TTFC / TPOC (seconds)."""
        for e in events:
            if isinstance(e, LatentChunk):
                self.chunks += 1
                if "ttfc_s" in e.timings:
                    self.ttfc_h.observe(e.timings["ttfc_s"])
                if "tpoc_s" in e.timings:
                    self.tpoc_h.observe(e.timings["tpoc_s"])

    def retry_hint(self, active: list[JobState]) -> float:
        """Seconds until the active job closest to finishing is done: its remaining steps times
        the step time of the current batch (the mean step time per job in a step, times the jobs
        active now: batching gains ~nothing on CPU, FIELD-NOTES; on GPU this errs long, never
        into a retry storm); at least :data:`MIN_RETRY_HINT_S`; 1 s when unknown."""
        left = [st.sched.total_forwards - st.sched.steps_done for st in active if st.sched.total_forwards is not None]
        if not self.job_steps or not left:
            return 1.0
        return max(MIN_RETRY_HINT_S, self.step_h.snapshot().sum / self.job_steps * len(active) * min(left))


def engine_stats(admission: Admission, pool, paused: Collection[str], counters: EngineCounters) -> EngineStats:
    """The engine's :class:`EngineStats`: its jobs (active, then queued) from ``admission``,
    ``pool``'s use (bytes, blocks), the ``paused`` job ids and ``counters``."""
    jobs = tuple(
        JobStat(st.job_id, st.state, admission.position(st.job_id), st.timings.steps, st.timings.chunks,
                st.timings.ttfc_s, st.timings.tpoc_s, 0 if st.ctx.kv is None else st.ctx.kv.reserved_bytes,
                paused=st.job_id in paused)
        for st in [*admission.active, *admission.queued]
    )
    c = counters
    return EngineStats(
        active_jobs=len(admission.active), queued_jobs=len(admission.queued),
        max_active_jobs=admission.max_active, queue_limit=admission.queue_limit,
        kv_pool_bytes=pool.nbytes, kv_pool_used_bytes=pool.used_blocks * pool.block_tokens * pool.token_bytes,
        kv_pool_blocks=pool.num_blocks, kv_pool_free_blocks=pool.free_blocks, steps=c.steps,
        chunks_produced=c.chunks, jobs_finished=dict(c.finished),
        last_step_s=None if c.last_step is None else c.last_step.duration_s,
        step_s=c.step_h.snapshot(), ttfc_s=c.ttfc_h.snapshot(), tpoc_s=c.tpoc_h.snapshot(), jobs=jobs,
        paused_jobs=len(paused),
    )
