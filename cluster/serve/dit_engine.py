"""``DiTEngine`` deployment: a thin Ray Serve shim over :class:`cluster.engine.AsyncEngine`.

One replica holds one engine (start-up: :func:`cluster.serve.dit_start.start_engine`); the
async engine steps it in a compute thread and streams each job's events. Errors: see
:meth:`cluster.engine.AsyncEngine.submit` / ``events``; all of them are picklable.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import AsyncIterator

from ray import serve

from cluster.config import ServiceConfig
from cluster.engine import AsyncEngine
from cluster.messages import CaptionEmbedding, EngineJob, LatentChunk, Progress, QueuePosition
from cluster.serve.dit_start import start_engine
from cluster.serve.metrics import EngineMetrics

RANK_HEALTH_TIMEOUT_S = 10.0  # a mesh rank that does not answer a health check in this time is dead


@serve.deployment(name="DiTEngine")
class DiTEngineDeployment:
    """Streams the events of jobs batched on one engine (see :meth:`run`)."""

    def __init__(self, cfg: ServiceConfig):
        self._engine = AsyncEngine(start_engine(cfg), on_step=EngineMetrics().after_step,
                                   max_buffered_chunks=cfg.engine.max_buffered_chunks,
                                   paused_timeout_s=cfg.engine.paused_timeout_s)

    async def run(self, job: EngineJob) -> AsyncIterator[QueuePosition | Progress | LatentChunk]:
        """Submit ``job`` and yield its events (:meth:`AsyncEngine.submit`, :meth:`AsyncEngine.events`;
        same errors). A caller that goes away (``asyncio.CancelledError``) cancels the job."""
        await self._engine.submit(job)
        async for event in self._engine.events(job.spec.job_id):
            yield event

    async def cancel(self, job_id: str) -> bool:
        """:meth:`AsyncEngine.cancel`: True if the job was queued or running here (its stream then
        ends cancelled); an unknown id is refused when it comes (see :mod:`cluster.serve.cancels`)."""
        return await self._engine.cancel(job_id)

    async def update_prompt(self, job_id: str, start_chunk: int, caption: CaptionEmbedding) -> None:
        """:meth:`AsyncEngine.update_prompt`. With several replicas Serve may route the call to one
        that does not run the job (JobNotFound); one replica (the default) holds every job."""
        await self._engine.update_prompt(job_id, start_chunk, caption)

    async def check_health(self) -> None:
        """Serve's health check: every other rank of the mesh must answer, else this raises
        RuntimeError and Serve replaces the replica (:meth:`cluster.serve.ranks.RayPeers.check`)."""
        if self._engine.engine.ranks is not None:
            await self._engine.engine.ranks.peers.check(RANK_HEALTH_TIMEOUT_S)

    def job_stats(self, job_id: str) -> dict | None:
        """A running or recently finished job's :class:`cluster.engine.JobStat` as a dict, or None."""
        stat = self._engine.stats(job_id)
        return None if stat is None else asdict(stat)

    def step_intervals(self, job_id: str) -> list[tuple[float, float]]:
        """Wall-clock (start, end) ``time.time()`` of the job's recent engine steps."""
        stat = self._engine.stats(job_id)
        return [] if stat is None else list(stat.step_intervals)

    def active_jobs(self) -> list[str]:
        """Ids of the jobs queued or running here."""
        return self._engine.active_jobs()

    async def engine_stats(self) -> dict:
        """The engine's counters (:class:`cluster.engine.EngineStats` as a dict)."""
        return asdict(await self._engine.engine_stats())
