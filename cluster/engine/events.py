"""Engine-side events and job handles of the multi-job API (plain Python).

``Engine.step()`` returns, in order, for every job of the step: ``cluster.messages.Progress``
(one per denoising step), ``cluster.messages.LatentChunk`` (a chunk became clean), and the
lifecycle events ``cluster.messages.JobAdmitted`` / ``JobFinished``. Route them by ``job_id``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cluster.messages import JobAdmitted, JobFinished, LatentChunk, Progress  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from cluster.engine.prepare import JobState
    from cluster.engine.runner import StepOutcome
    from cluster.scheduler.plan import StepPlan


class QueueView(Protocol):
    """What a :class:`JobHandle` asks its engine (:class:`cluster.engine.loop.Engine`)."""

    def queue_position(self, job_id: str) -> int | None: ...


@dataclass(frozen=True)
class StepInfo:
    """What the last engine step ran: ``index`` (0-based), ``duration_s`` (wall, whole step),
    ``job_ids`` (jobs in the forward, in order), ``windows`` (branch windows packed),
    ``tokens`` (query tokens of the forward)."""

    index: int
    duration_s: float
    job_ids: tuple[str, ...]
    windows: int
    tokens: int


class JobHandle:
    """Live view of a submitted job (returned by ``Engine.submit``).

    Attributes are read from the engine on access: ``state`` ("queued", "active", "done",
    "cancelled", "failed"), ``queue_position`` (0-based, None unless queued), ``done``,
    ``num_chunks`` (None = until cancelled), ``total_forwards``, ``chunks_emitted``,
    ``ttfc_s`` / ``tpoc_s`` (seconds, None until known), ``error``.
    """

    def __init__(self, engine: QueueView, st: "JobState"):
        self._engine, self._st = engine, st
        self.job_id = st.job_id

    @property
    def state(self) -> str:
        return self._st.state

    @property
    def done(self) -> bool:
        return self._st.state in ("done", "cancelled", "failed")

    @property
    def error(self) -> str | None:
        return self._st.error

    @property
    def queue_position(self) -> int | None:
        return self._engine.queue_position(self.job_id)

    @property
    def num_chunks(self) -> int | None:
        n = self._st.sched.num_chunks
        return None if n is None else n - self._st.ctx.chunk_offset

    @property
    def total_forwards(self) -> int | None:
        return self._st.sched.total_forwards

    @property
    def chunks_emitted(self) -> int:
        return len(self._st.sched.emitted)

    @property
    def ttfc_s(self) -> float | None:
        return self._st.timings.ttfc_s

    @property
    def tpoc_s(self) -> float | None:
        return self._st.timings.tpoc_s

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r}, state={self.state!r}, chunks_emitted={self.chunks_emitted})"


def job_events(st: "JobState", plan: "StepPlan", out: "StepOutcome", step_s: float) -> list:
    """One job's events of a step: a ``Progress`` when it denoised (``chunk`` = oldest chunk in
    flight relative to the first generated chunk, ``step`` 1..num_steps; none for the V2V prefix
    extraction), then a ``LatentChunk`` per chunk that became clean (with its timings: the
    step's wall time ``dit_step_s`` in seconds, TTFC / TPOC so far). Records the step."""
    ctx, events = st.ctx, []
    st.timings.steps += 1
    den = plan.denoise_slots
    if den:
        events.append(Progress(st.job_id, den[0].chunk - ctx.chunk_offset, den[0].step_index + 1, ctx.num_steps))
    now = time.perf_counter()
    for chunk, latent in out.emitted.items():
        timings = {"dit_step_s": step_s, **st.timings.chunk(now)}
        events.append(LatentChunk(st.job_id, chunk - ctx.chunk_offset, latent, timings))
    return events
