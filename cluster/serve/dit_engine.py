"""``DiTEngine`` deployment: a thin Ray Serve shim over :class:`cluster.engine.Engine`.

One replica holds the DiT weights and runs jobs step by step (one
plan -> execute -> update per ``JobRun.step``, DESIGN.md section 2). Each step
runs in the replica's single compute thread, so concurrent jobs interleave step
by step and the event loop stays free to stream events and notice cancellation.
A cancelled stream (client gone: ``asyncio.CancelledError``) stops the job
between steps and releases its KV storage.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import asdict, dataclass
from typing import AsyncIterator

from ray import serve

from cluster.config import ServiceConfig
from cluster.messages import EngineJob, LatentChunk, Progress
from cluster.serve.compute import ComputeThread, prepare_replica

_HISTORY = 256  # finished jobs whose stats stay queryable


@dataclass
class JobStats:
    """What a replica knows about one job (returned by :meth:`DiTEngineDeployment.job_stats`).

    Attributes:
        state: "running", "done", "cancelled" or "failed".
        steps: engine steps (DiT forwards) run so far.
        total_forwards: forwards the whole job needs (None if unbounded/unknown).
        chunks_emitted: clean latent chunks produced.
        finished_at: ``time.time()`` when the job stopped, or None while running.
    """

    state: str = "running"
    steps: int = 0
    total_forwards: int | None = None
    chunks_emitted: int = 0
    finished_at: float | None = None


@serve.deployment(name="DiTEngine")
class DiTEngineDeployment:
    """Streams ``Progress`` / ``LatentChunk`` events of a job (see :meth:`run`)."""

    def __init__(self, cfg: ServiceConfig):
        from cluster.engine import Engine  # noqa: PLC0415  (torch only inside the replica)
        from stages.dit.weights import load_dit  # noqa: PLC0415

        model, paths = prepare_replica(cfg, cfg.deployments.dit_engine)
        self._engine = Engine(model, load_dit(paths.dit, model.dit), device="cpu")
        self._compute = ComputeThread("dit-step")
        self._jobs: collections.OrderedDict[str, JobStats] = collections.OrderedDict()

    async def run(self, job: EngineJob) -> AsyncIterator[Progress | LatentChunk]:
        """Run ``job`` to completion, yielding its events as each step produces them.

        Yields:
            :class:`cluster.messages.Progress` after each step and
            :class:`cluster.messages.LatentChunk` (float32 (C, T, H, W) scaled
            latent) when a chunk becomes clean, in the engine's order.
        Raises:
            asyncio.CancelledError: the caller went away; the job stops after the
                step in progress and its KV storage is released.
        """
        run = await self._compute.call(self._engine.start, job)
        stats = self._track(job.spec.job_id, JobStats(total_forwards=run.total_forwards))
        step = None
        try:
            while not run.done:
                step = self._compute.submit(_counted_step, run, stats, tag=job.spec.job_id)
                for event in await asyncio.shield(step):
                    yield event
            stats.state = "done"
        except (asyncio.CancelledError, GeneratorExit):  # consumer cancelled or closed the stream
            stats.state = "cancelled"
            raise
        except BaseException:
            stats.state = "failed"
            raise
        finally:
            if step is not None and not step.done():
                await asyncio.wait([step])  # never free KV under a running step
            await self._compute.call(run.close if stats.state == "done" else run.cancel)
            stats.finished_at = time.time()

    def job_stats(self, job_id: str) -> dict | None:
        """Stats of a running or recently finished job (see :class:`JobStats`), or None."""
        stats = self._jobs.get(job_id)
        return None if stats is None else asdict(stats)

    def step_intervals(self, job_id: str) -> list[tuple[float, float]]:
        """Wall-clock (start, end) ``time.time()`` of the job's recent engine steps."""
        return self._compute.intervals(job_id)

    def active_jobs(self) -> list[str]:
        """Ids of the jobs this replica is running now."""
        return [job_id for job_id, s in self._jobs.items() if s.state == "running"]

    def _track(self, job_id: str, stats: JobStats) -> JobStats:
        finished = [j for j, s in self._jobs.items() if s.state != "running"]
        for old in finished[: max(0, len(self._jobs) + 1 - _HISTORY)]:
            del self._jobs[old]
        self._jobs[job_id] = stats
        return stats


def _counted_step(run, stats: JobStats) -> list:
    """One engine step (compute thread), counted in ``stats`` as soon as it finishes."""
    events = run.step()
    stats.steps += 1
    stats.chunks_emitted += sum(isinstance(e, LatentChunk) for e in events)
    return events
