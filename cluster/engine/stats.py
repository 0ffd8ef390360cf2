"""Engine observability as plain Python objects (the deployment exports them, e.g. through
``ray.serve.metrics``; the engine never imports ray).

* :class:`Histogram`: cumulative Prometheus-style histogram (bucket upper bounds in seconds).
* :class:`JobTimings`: per-job clock: submit, admission, first chunk, chunk intervals.
  TTFC = first chunk time - submit time (queue wait included); TPOC = time between
  consecutive chunks of a job (the first chunk excluded).
* :class:`EngineStats`: snapshot returned by ``Engine.stats()``: active / queued jobs, KV pool
  use, step time, TTFC / TPOC histograms, chunks produced, jobs finished by outcome, and one
  :class:`JobStat` per queued or active job (``AsyncEngine.stats`` gives the same record for
  finished jobs too).
Each ``LatentChunk.timings`` also carries ``dit_step_s`` and ``ttfc_s`` (first chunk) or
``tpoc_s`` (later chunks), so a deployment can observe histograms event by event.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

DEFAULT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    """``counts[i]`` = observations <= ``buckets[i]`` (cumulative); ``count`` includes +Inf."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


class Histogram:
    """Cumulative histogram of seconds.

    Args:
        buckets: ascending upper bounds (seconds).
    """

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS_S):
        self.buckets = tuple(sorted(buckets))
        self._per_bucket = [0] * len(self.buckets)
        self.count, self.sum = 0, 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self._per_bucket[i] += 1
        self.count += 1
        self.sum += float(value)

    def snapshot(self) -> HistogramSnapshot:
        running, counts = 0, []
        for n in self._per_bucket:
            running += n
            counts.append(running)
        return HistogramSnapshot(self.buckets, tuple(counts), self.count, self.sum)


def ttfc_tpoc(start: float, first: float | None, last: float | None, chunks: int) -> tuple[float | None, float | None]:
    """(TTFC, TPOC) in seconds from a job's start, its first and last chunk times and its chunk
    count: TTFC = first - start; TPOC = (last - first) / (chunks - 1), the mean gap between
    consecutive chunks. None where not known yet (no chunk; fewer than two chunks). The one
    formula of both: the engine's :class:`JobTimings` and the ingress' ``StreamClock``."""
    ttfc = None if first is None else first - start
    tpoc = (last - first) / (chunks - 1) if chunks > 1 else None
    return ttfc, tpoc


@dataclass
class JobTimings:
    """Monotonic-clock timestamps of one job (``time.perf_counter`` seconds) and the one place
    TTFC / TPOC are computed (the engine's events, stats and metrics all read them from here).

    TTFC = first chunk - submit (queue wait included); TPOC = mean gap between consecutive
    chunks (:func:`ttfc_tpoc`). Constant memory for endless jobs.
    """

    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_chunk: float | None = None
    last_chunk: float | None = None
    chunks: int = 0
    steps: int = 0

    def chunk(self, now: float) -> dict[str, float]:
        """Record a chunk emitted at ``now``; returns its ``ttfc_s`` (first chunk) or ``tpoc_s``
        (the gap since the previous chunk)."""
        previous, self.last_chunk = self.last_chunk, now
        self.chunks += 1
        if previous is None:
            self.first_chunk = now
            return {"ttfc_s": self.ttfc_s}
        return {"tpoc_s": now - previous}

    @property
    def ttfc_s(self) -> float | None:
        return ttfc_tpoc(self.submitted, self.first_chunk, self.last_chunk, self.chunks)[0]

    @property
    def tpoc_s(self) -> float | None:
        """Mean time per output chunk after the first, None before the second chunk."""
        return ttfc_tpoc(self.submitted, self.first_chunk, self.last_chunk, self.chunks)[1]


@dataclass(frozen=True)
class JobStat:
    """One job as the engine sees it: in ``Engine.stats().jobs`` (queued / active jobs) and from
    ``AsyncEngine.stats(job_id)`` (also recently finished ones).

    Attributes:
        job_id: the job.
        state: "queued" / "active" while in the engine, then "done", "cancelled" or "failed".
        queue_position: jobs ahead of it in the admission queue (0-based), None unless queued.
        steps: engine steps (DiT forwards) it took part in.
        chunks: clean latent chunks it emitted.
        ttfc_s, tpoc_s: seconds (:class:`JobTimings`), None until known.
        kv_bytes: its KV-pool region, bytes (0 while queued or once finished).
        total_forwards: forwards the whole job needs (None if endless or unknown).
        finished_at: ``time.time()`` when it left the engine, None while it runs.
        step_intervals: (start, end) ``time.time()`` of its most recent steps, oldest first.
        paused: the engine holds it out of its steps (its reader is behind; KV region kept).
        pauses: times it was paused so far (``AsyncEngine`` records; 0 in ``Engine.stats``).
    """

    job_id: str
    state: str
    queue_position: int | None
    steps: int
    chunks: int
    ttfc_s: float | None
    tpoc_s: float | None
    kv_bytes: int
    total_forwards: int | None = None
    finished_at: float | None = None
    step_intervals: tuple[tuple[float, float], ...] = ()
    paused: bool = False
    pauses: int = 0

    @property
    def running(self) -> bool:
        return self.finished_at is None


@dataclass(frozen=True)
class EngineStats:
    """Snapshot of the engine (see module docstring). Bytes are KV-pool bytes; ``paused_jobs``
    (counted in ``active_jobs``) hold their KV region but sit out the steps."""

    active_jobs: int
    queued_jobs: int
    max_active_jobs: int
    queue_limit: int
    kv_pool_bytes: int
    kv_pool_used_bytes: int
    kv_pool_blocks: int
    kv_pool_free_blocks: int
    steps: int
    chunks_produced: int
    jobs_finished: dict[str, int]
    last_step_s: float | None
    step_s: HistogramSnapshot
    ttfc_s: HistogramSnapshot
    tpoc_s: HistogramSnapshot
    jobs: tuple[JobStat, ...]
    paused_jobs: int = 0

    @property
    def kv_pool_utilization(self) -> float:
        return self.kv_pool_used_bytes / self.kv_pool_bytes if self.kv_pool_bytes else 0.0
