"""The async engine's per-job record: event queue, lifecycle state, stats (plain Python).

One :class:`JobStream` per job known to :class:`cluster.engine.async_engine.AsyncEngine`
(queued, running, or recently finished). It is also where a bounded per-job event buffer
(pausing a job whose client is behind) belongs.
"""

from __future__ import annotations

import asyncio
import collections
import time

from cluster.engine.stats import JobStat

STEP_HISTORY = 64  # step intervals kept per job


class JobStream:
    """The async engine's record of one job: its event queue and what :meth:`stat` reports.

    Only the event loop touches it. ``state`` moves queued -> active -> done / cancelled /
    failed, only through :meth:`admitted` and :meth:`end`, never back; the queue holds the
    job's events, then None once it ended.
    """

    def __init__(self, job_id: str):
        self.job_id, self.state, self.error = job_id, "queued", None
        self.queue: asyncio.Queue = asyncio.Queue()  # events, then None once ended
        self.position: int | None = None  # last queue position sent
        self.steps = self.chunks = self.kv_bytes = 0
        self.timings: tuple[float | None, float | None] = (None, None)
        self.total_forwards: int | None = None
        self.finished_at: float | None = None
        self.intervals: collections.deque = collections.deque(maxlen=STEP_HISTORY)

    @property
    def ended(self) -> bool:
        return self.finished_at is not None

    def admitted(self) -> None:
        if self.state == "queued":
            self.state, self.position = "active", None

    def end(self, state: str, error: str | None = None) -> None:
        """The first end wins; the stream ends after the events already queued."""
        if not self.ended:
            self.state, self.error, self.finished_at, self.kv_bytes = state, error, time.time(), 0
            self.queue.put_nowait(None)

    def stat(self) -> JobStat:
        return JobStat(self.job_id, self.state, self.position if self.state == "queued" else None, self.steps,
                       self.chunks, *self.timings, self.kv_bytes, self.total_forwards, self.finished_at,
                       tuple(self.intervals))
