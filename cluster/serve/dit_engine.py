"""``DiTEngine`` deployment: a thin Ray Serve shim over :class:`cluster.engine.AsyncEngine`
(start-up: :func:`cluster.serve.dit_start.start_engine`). Errors: see ``AsyncEngine.submit`` /
``events``; refusals cross as :class:`cluster.messages.Refusal` values, the rest raised."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import AsyncIterator

from ray import serve

from cluster.config import ServiceConfig
from cluster.engine import EngineBusy, JobCancelled, JobNotFound
from cluster.engine.service import async_engine_for
from cluster.messages import CaptionEmbedding, EngineJob, LatentChunk, Progress, QueuePosition, Refusal
from cluster.serve.dit_start import start_engine
from cluster.serve.metrics import EngineMetrics
from stages.errors import InvalidInput

log = logging.getLogger("ray.serve")
RANK_HEALTH_TIMEOUT_S = 10.0  # a mesh rank that does not answer a health check in this time is dead
REFUSALS = (InvalidInput, EngineBusy, JobNotFound, JobCancelled)  # returned as a Refusal: one log line


@serve.deployment(name="DiTEngine")
class DiTEngineDeployment:
    """Streams the events of jobs batched on one engine (see :meth:`run`)."""

    def __init__(self, cfg: ServiceConfig):
        self._engine = async_engine_for(start_engine(cfg), cfg.engine, on_step=EngineMetrics().after_step)

    async def run(self, job: EngineJob) -> AsyncIterator[QueuePosition | Progress | LatentChunk | Refusal]:
        """Submit ``job`` and yield its events (:meth:`AsyncEngine.submit`, :meth:`AsyncEngine.events`);
        a refusal (:data:`REFUSALS`) ends the stream as a :class:`Refusal`, other errors are
        raised. A caller that goes away (``asyncio.CancelledError``) cancels the job."""
        try:
            await self._engine.submit(job)
            async for event in self._engine.events(job.spec.job_id):
                yield event
        except REFUSALS as exc:
            yield _refused(f"job {job.spec.job_id}", exc)

    async def cancel(self, job_id: str) -> bool:
        """:meth:`AsyncEngine.cancel`: True if the job was queued or running here (its stream then
        ends cancelled); an unknown id is refused when it comes (see :mod:`cluster.serve.cancels`)."""
        return await self._engine.cancel(job_id)

    async def update_prompt(self, job_id: str, start_chunk: int, caption: CaptionEmbedding) -> Refusal | None:
        """:meth:`AsyncEngine.update_prompt`; JobNotFound / InvalidInput come back as a :class:`Refusal`
        (with several replicas, Serve may route the call to one that does not run the job)."""
        try:
            await self._engine.update_prompt(job_id, start_chunk, caption)
        except REFUSALS as exc:
            return _refused(f"prompt update of job {job_id}", exc)
        return None

    async def check_health(self) -> None:
        """Serve's health check: RuntimeError (Serve replaces the replica) when a mesh rank is lost."""
        if self._engine.engine.ranks is not None:
            await self._engine.engine.ranks.peers.check(RANK_HEALTH_TIMEOUT_S)

    def job_stats(self, job_id: str) -> dict | None:
        """A running or recently finished job's :class:`cluster.engine.JobStat` as a dict, or None."""
        stat = self._engine.stats(job_id)
        return None if stat is None else asdict(stat)

    def active_jobs(self) -> list[str]:
        """Ids of the jobs queued or running here."""
        return self._engine.active_jobs()

    async def engine_stats(self) -> dict:
        """The engine's counters (:class:`cluster.engine.EngineStats` as a dict)."""
        return asdict(await self._engine.engine_stats())


def _refused(what: str, exc: Exception) -> Refusal:
    log.info("%s refused: %s: %s", what, type(exc).__name__, exc)
    return Refusal(exc)
