"""Engine-side events and job handles of the multi-job API (plain Python).

``Engine.step()`` returns, in order, for every job of the step: ``cluster.messages.Progress``
(one per denoising step), ``cluster.messages.LatentChunk`` (a chunk became clean), and the
lifecycle events below. Route them by ``job_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from cluster.engine.prepare import JobState


class QueueView(Protocol):
    """What a :class:`JobHandle` asks its engine (:class:`cluster.engine.loop.Engine`)."""

    def queue_position(self, job_id: str) -> int | None: ...


@dataclass(frozen=True)
class JobAdmitted:
    """A queued or newly submitted job got its KV region; it runs from this step on.
    ``queued_s``: seconds it waited (0 when admitted at submit)."""

    job_id: str
    queued_s: float


@dataclass(frozen=True)
class JobFinished:
    """A job left the engine: ``state`` "done" (last chunk emitted), "cancelled" or "failed"
    (``error`` says why); ``chunks``: chunks it emitted. Its KV region is back in the pool."""

    job_id: str
    state: str
    chunks: int
    error: str | None = None


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
