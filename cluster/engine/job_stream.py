"""The async engine's per-job record: event queue, lifecycle state, stats (plain Python).

One :class:`JobStream` per job known to :class:`cluster.engine.async_engine.AsyncEngine`
(queued, running, or recently finished). It counts the clean chunks put in its queue and not
yet taken by the reader: :meth:`put` says when that reaches ``max_buffered`` (pause the job),
:meth:`took` when it drops below again (resume it).
"""

from __future__ import annotations

import asyncio
import collections
import time

from cluster.engine.stats import JobStat
from cluster.messages import LatentChunk, QueuePosition

STEP_HISTORY = 64  # step intervals kept per job


class JobStream:
    """The async engine's record of one job: its event queue and what :meth:`stat` reports.

    Only the event loop touches it. ``state`` moves queued -> active -> done / cancelled /
    failed, only through :meth:`admitted` and :meth:`end`, never back; the queue holds the
    job's events, then None once it ended.

    Args:
        job_id: the job.
        max_buffered: clean chunks (``LatentChunk``) in the queue at which :meth:`put` asks
            for a pause (``engine.max_buffered_chunks``).
    """

    def __init__(self, job_id: str, max_buffered: int):
        self.job_id, self.state, self.error = job_id, "queued", None
        self.max_buffered = max_buffered
        self.buffered = 0  # LatentChunks in the queue, not yet taken by the reader
        self.paused, self.pauses = False, 0
        self.pause_timer = None  # asyncio.TimerHandle: cancels a job paused too long
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

    def put(self, event) -> bool:
        """Queue an engine event; True when the job should be paused now (its reader has
        ``max_buffered`` clean chunks not taken, and it runs and is not paused yet)."""
        self.queue.put_nowait(event)
        self.buffered += isinstance(event, LatentChunk)
        return not self.ended and not self.paused and self.buffered >= self.max_buffered

    def took(self, event) -> bool:
        """The reader took ``event`` from the queue; True when a paused job should resume."""
        self.buffered -= isinstance(event, LatentChunk)
        return self.paused and not self.ended and self.buffered < self.max_buffered

    def send_position(self, position: int) -> None:
        """Queue a :class:`QueuePosition` if ``position`` (0 = next) differs from the last sent."""
        if self.position != position:
            self.position = position
            self.queue.put_nowait(QueuePosition(self.job_id, position))

    def ran_step(self, start: float, end: float, timings: tuple[float | None, float | None]) -> None:
        """The job was in a step from ``start`` to ``end`` (time.time()); ``timings``: (ttfc_s, tpoc_s)."""
        self.steps += 1
        self.intervals.append((start, end))
        self.timings = timings

    def set_paused(self, paused: bool, timer=None) -> None:
        """Record a pause (with the timer that ends it if it lasts) or a resume."""
        if self.pause_timer is not None:
            self.pause_timer.cancel()
        self.paused, self.pause_timer = paused, timer
        self.pauses += paused

    def end(self, state: str, error: str | None = None) -> None:
        """The first end wins; the stream ends after the events already queued."""
        if not self.ended:
            self.state, self.error, self.finished_at, self.kv_bytes = state, error, time.time(), 0
            self.set_paused(False)
            self.queue.put_nowait(None)

    def stat(self) -> JobStat:
        return JobStat(self.job_id, self.state, self.position if self.state == "queued" else None, self.steps,
                       self.chunks, *self.timings, self.kv_bytes, self.total_forwards, self.finished_at,
                       tuple(self.intervals), self.paused, self.pauses)
