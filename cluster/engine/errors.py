"""Errors of the DiT engine's multi-job API (plain Python; the serve layer maps them to gRPC codes).

* :class:`EngineBusy` -> ``RESOURCE_EXHAUSTED`` with ``retry_after_s`` as the retry hint
  (the admission queue is full).
* :class:`JobNotFound` -> ``NOT_FOUND`` (no queued or active job with that id).
* :class:`JobCancelled` -> ``CANCELLED`` (ends the stream of a job that ``cancel`` stopped).
* :class:`JobFailed` -> ``INTERNAL`` (the engine failed the job; the message says why).
* bad fields (``start_chunk`` of a prompt update, sizes the pool can never hold, ...) raise
  :class:`stages.errors.InvalidInput` -> ``INVALID_ARGUMENT``.
"""

from __future__ import annotations


class EngineBusy(RuntimeError):
    """The engine's admission queue is full; try again later. Picklable (crosses Ray).

    Attributes:
        queue_limit: jobs the queue holds; active: jobs running; queued: jobs waiting.
        retry_after_s: seconds after which a retry has a fair chance (an estimate from the
            step times and the remaining steps of the running jobs).
    """

    def __init__(self, *, queue_limit: int, active: int, queued: int, retry_after_s: float):
        self.queue_limit, self.active, self.queued = queue_limit, active, queued
        self.retry_after_s = float(retry_after_s)
        super().__init__(
            f"DiT engine at capacity: {active} jobs running, {queued} queued (queue limit {queue_limit}); "
            f"retry in about {self.retry_after_s:.1f} s"
        )

    def __reduce__(self):
        return _engine_busy, (self.queue_limit, self.active, self.queued, self.retry_after_s)


def _engine_busy(queue_limit: int, active: int, queued: int, retry_after_s: float) -> EngineBusy:
    return EngineBusy(queue_limit=queue_limit, active=active, queued=queued, retry_after_s=retry_after_s)


class JobNotFound(KeyError):
    """No queued or active job has this id (it finished, was cancelled, or never existed)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(job_id)

    def __str__(self) -> str:
        return f"no queued or running job {self.job_id!r} on this engine"


class JobCancelled(RuntimeError):
    """A job's event stream ended because the job was cancelled (``AsyncEngine.cancel``, also a
    cancel that came before the job). Picklable (crosses Ray).

    Attributes:
        job_id: the cancelled job.
    """

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id} was cancelled"


class JobFailed(RuntimeError):
    """The engine failed a job (a failing forward, or a bug in the step loop). Picklable.

    Attributes:
        job_id: the failed job; reason: what failed, in words (no traceback).
    """

    def __init__(self, job_id: str, reason: str | None):
        super().__init__(job_id, reason)
        self.job_id, self.reason = job_id, reason or "unknown error"

    def __str__(self) -> str:
        return f"engine failed job {self.job_id}: {self.reason}"
