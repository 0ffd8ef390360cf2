"""Messages and records of the ``DiTEngine`` deployment that cross Ray (picklable): the
admission-queue event, the engine-full error and per-job stats."""

from __future__ import annotations

from dataclasses import dataclass, field


class EngineFull(RuntimeError):
    """:class:`cluster.engine.EngineBusy` in a form that crosses Ray (picklable).

    Attributes:
        retry_after_s: seconds after which a retry has a fair chance.
    """

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message, retry_after_s)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class QueuePosition:
    """Event of :meth:`DiTEngineDeployment.run`: the job waits for admission to the engine.

    Attributes:
        job_id: the job.
        position: jobs ahead of it in the admission queue (0 = admitted next). Sent when the
            job is queued and whenever its position changes, until it starts (its first
            ``Progress``).
    """

    job_id: str
    position: int


@dataclass
class JobStats:
    """What a replica knows about one job (returned by :meth:`DiTEngineDeployment.job_stats`).

    Attributes:
        state: "queued" / "active" while in the engine, then "done", "cancelled" or "failed".
        steps: engine steps (DiT forwards) the job took part in.
        total_forwards: forwards the whole job needs (None if unbounded).
        chunks_emitted: clean latent chunks produced.
        finished_at: ``time.time()`` when the job left the engine, or None.
        step_intervals: (start, end) ``time.time()`` of its last steps (at most 64).
    """

    state: str = "queued"
    steps: int = 0
    total_forwards: int | None = None
    chunks_emitted: int = 0
    finished_at: float | None = None
    step_intervals: list[tuple[float, float]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.finished_at is None
