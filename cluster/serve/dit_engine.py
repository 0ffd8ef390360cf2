"""``DiTEngine`` deployment: a thin Ray Serve shim over :class:`cluster.engine.Engine`.

One replica holds the DiT and one engine; with ``parallel.cp_size x parallel.pp_size > 1`` the
replica is rank 0 of a parallel mesh whose other ranks are actors in its placement group
(:mod:`cluster.serve.ranks`, :mod:`cluster.engine.ranks`). Jobs are submitted to the engine's
multi-job API; a single step loop runs ``Engine.step()`` (one packed forward over
every active job: continuous batching, DESIGN.md section 2) in the replica's
compute thread and routes each job's ``Progress`` / ``LatentChunk`` events to the
job's stream. The event loop stays free to stream and to notice cancellation: a
cancelled stream (client gone: ``asyncio.CancelledError``) cancels the job in the
engine between two steps, which frees its KV region at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import asdict
from typing import AsyncIterator

from ray import serve

from cluster.capacity import replica_capacity
from cluster.config import ServiceConfig
from cluster.engine import Engine, EngineBusy, JobAdmitted, JobFinished
from cluster.messages import CaptionEmbedding, EngineJob, LatentChunk, Progress
from cluster.serve.cancels import EarlyCancels, JobCancelled
from cluster.serve.compute import DTYPES, ComputeThread, prepare_replica, replica_device
from cluster.serve.engine_types import EngineFull, JobStats, QueuePosition
from cluster.serve.metrics import EngineMetrics
from cluster.serve.ranks import start_rank_group
from stages.errors import InvalidInput

log = logging.getLogger(__name__)
_HISTORY = 256  # finished jobs whose stats stay queryable
_STEP_HISTORY = 64  # step intervals kept per job
RANK_HEALTH_TIMEOUT_S = 10.0  # a mesh rank that does not answer a health check in this time is dead


def start_engine(cfg: ServiceConfig) -> Engine:
    """The replica's engine: capacity check first (before any weights are loaded or checkpoints
    looked for), then the parallel mesh's other ranks (if any), then rank 0's DiT.

    Raises:
        cluster.capacity.DoesNotFit: the model cannot fit the replica's devices (the replica
            refuses to start; the message says what is short and what to change).
        ValueError / RuntimeError: a mesh the model cannot be split into, an attention backend
            that cannot run, ranks that did not start (see :func:`cluster.serve.ranks.start_rank_group`).
    """
    settings = cfg.deployments.dit_engine
    device, dtype = replica_device(settings)
    capacity = replica_capacity(cfg, cfg.load_model(), dtype=dtype)
    model, paths = prepare_replica(cfg, settings)
    log.info("DiTEngine capacity: %d jobs, %d KV-pool blocks\n%s", capacity.max_active_jobs,
             capacity.kv_pool_blocks, capacity.plan.explain())
    ranks = None
    if cfg.parallel.world_size > 1:
        ranks = start_rank_group(cfg.parallel, settings, model, str(paths.dit), device, dtype, settings.torch_threads,
                                 attention=cfg.engine.attention)
    return Engine.from_checkpoint(model, paths.dit, device=device, dtype=DTYPES[dtype], ranks=ranks,
                                  attention=cfg.engine.attention, queue_limit=cfg.engine.queue_limit,
                                  **capacity.engine_kwargs())


@serve.deployment(name="DiTEngine")
class DiTEngineDeployment:
    """Streams ``Progress`` / ``LatentChunk`` events of jobs batched on one engine (see :meth:`run`)."""

    def __init__(self, cfg: ServiceConfig):
        self._engine = start_engine(cfg)
        self._compute = ComputeThread("dit-step")
        self._streams: dict[str, asyncio.Queue] = {}
        self._jobs: collections.OrderedDict[str, JobStats] = collections.OrderedDict()
        self._loop_task: asyncio.Task | None = None
        self._metrics = EngineMetrics()
        self._positions: dict[str, int] = {}  # last queue position sent per queued job
        self._early_cancels = EarlyCancels()  # cancels of jobs not here yet

    async def run(self, job: EngineJob) -> AsyncIterator[Progress | LatentChunk]:
        """Run ``job`` in the engine, yielding its events as the steps produce them.

        Yields:
            :class:`QueuePosition` first while the engine queues the job (and when its
            position changes), then :class:`cluster.messages.Progress` per denoising step and
            :class:`cluster.messages.LatentChunk` (float32 (C, T, H, W) scaled latent)
            when a chunk becomes clean, in the engine's order.
        Raises:
            stages.errors.InvalidInput: a field the engine cannot use (named), or a
                ``job_id`` already queued or running here.
            EngineFull: the engine's admission queue is full (retry hint).
            cluster.serve.cancels.JobCancelled: :meth:`cancel` stopped the job (also a
                cancel that came before the job did).
            RuntimeError: the engine failed the job (its message says why).
            asyncio.CancelledError: the caller went away; the job is cancelled in the
                engine before its next step (also when that happens during its submit).
        """
        job_id = job.spec.job_id
        if job_id in self._streams:
            raise InvalidInput("job_id", f"job {job_id!r} is already queued or running")
        if self._early_cancels.consume(job_id):  # cancel(job_id) came first: never start it
            self._track(job_id, JobStats(state="cancelled", finished_at=time.time()))
            raise JobCancelled(job_id)
        events: asyncio.Queue = asyncio.Queue()
        self._streams[job_id] = events
        stats = self._track(job_id, JobStats())  # before the submit, so cancel() sees the job
        try:
            handle = await self._admit(job, stats, events)
            while (event := await events.get()) is not None:
                yield event
            if stats.state == "failed":
                raise RuntimeError(f"engine failed job {job_id}: {handle.error}")
            if stats.state == "cancelled":
                raise JobCancelled(job_id)
        except (asyncio.CancelledError, GeneratorExit):  # the consumer cancelled or closed the stream
            if stats.running:  # one FIFO compute thread: runs after a submit still in flight
                await self._compute.call(self._engine.cancel, job_id)
                self._finish(job_id, "cancelled")
            raise
        finally:
            self._streams.pop(job_id, None)
            self._positions.pop(job_id, None)

    async def _admit(self, job: EngineJob, stats: JobStats, events: asyncio.Queue):
        """Submit ``job`` in the compute thread; fill ``stats``, queue its first position.

        Returns the engine's job handle. A refused job (EngineFull, InvalidInput) is
        dropped from the stats. A :meth:`cancel` during the submit already finished
        ``stats`` (and queued the stream's end).
        """
        job_id = job.spec.job_id
        try:
            handle, position = await self._compute.call(self._submit, job)
        except Exception as exc:
            if self._jobs.get(job_id) is stats:
                del self._jobs[job_id]
            if isinstance(exc, EngineBusy):  # its keyword-only __init__ does not survive pickling
                raise EngineFull(str(exc), exc.retry_after_s) from None
            raise
        stats.total_forwards = handle.total_forwards
        if stats.running:
            stats.state = handle.state
            if position is not None:
                self._positions[job_id] = position
                events.put_nowait(QueuePosition(job_id, position))
        self._ensure_step_loop()
        return handle

    def _submit(self, job: EngineJob):
        """Compute thread: submit; returns (handle, queue position or None when admitted)."""
        handle = self._engine.submit(job)
        return handle, handle.queue_position

    async def update_prompt(self, job_id: str, start_chunk: int, caption: CaptionEmbedding) -> None:
        """Use ``caption`` (float32 (L, D) embedding, int64 (L,) mask) for the job's generated
        chunks from ``start_chunk`` on (:meth:`cluster.engine.Engine.update_prompt`); chunks
        before it are bitwise unchanged.

        Only this replica's jobs can be updated: with several DiTEngine replicas, Serve may
        route the call to a replica that does not run the job (then JobNotFound). With one
        replica (the default) every job is here.

        Raises:
            cluster.engine.JobNotFound: no queued or running job ``job_id`` here.
            stages.errors.InvalidInput: "start_chunk" already in flight or past the last
                chunk; "caption" of the wrong shape.
        """
        await self._compute.call(self._engine.update_prompt, job_id, start_chunk, caption)

    async def check_health(self) -> None:
        """Serve's periodic health check: with a parallel mesh, every other rank must answer
        (:meth:`cluster.serve.ranks.RayPeers.check`); raising makes Serve replace the replica.

        Raises:
            RuntimeError: a rank of the replica's mesh died or does not answer.
        """
        if self._engine.ranks is not None:
            await self._engine.ranks.peers.check(RANK_HEALTH_TIMEOUT_S)

    def job_stats(self, job_id: str) -> dict | None:
        """Stats of a running or recently finished job (see :class:`JobStats`), or None."""
        stats = self._jobs.get(job_id)
        return None if stats is None else asdict(stats)

    def step_intervals(self, job_id: str) -> list[tuple[float, float]]:
        """Wall-clock (start, end) ``time.time()`` of the job's recent engine steps."""
        stats = self._jobs.get(job_id)
        return [] if stats is None else list(stats.step_intervals)

    async def cancel(self, job_id: str) -> bool:
        """Cancel ``job_id`` now (idempotent): it leaves the next engine step and its KV
        storage returns to the pool; its :meth:`run` stream ends with JobCancelled. The
        ingress calls this when a client stream ends early (besides cancelling the DiT
        stream) and for the ``Cancel`` RPC, so cancellation never depends on Serve passing a
        stream cancel on (see :mod:`cluster.serve.cancels`). A job id this replica has not
        seen is remembered for ``cancels.CANCEL_MEMORY_S`` and refused when it arrives; a
        finished job is left alone. Returns whether the job was queued or running here."""
        stats = self._jobs.get(job_id)
        if stats is None:
            self._early_cancels.add(job_id)
            return False
        if not stats.running:
            return False
        await self._compute.call(self._engine.cancel, job_id)
        self._finish(job_id, "cancelled")
        return True

    def active_jobs(self) -> list[str]:
        """Ids of the jobs queued or running in this replica's engine."""
        return [job_id for job_id, s in self._jobs.items() if s.running]

    def engine_stats(self) -> dict:
        """The engine's counters (:class:`cluster.engine.EngineStats` as a dict)."""
        return asdict(self._engine.stats())

    def metrics(self) -> dict:
        """The values this replica last exported as Prometheus metrics
        (:class:`cluster.serve.metrics.ExportedValues` as a dict; see :mod:`cluster.serve.metrics`)."""
        return asdict(self._metrics.values)

    def _ensure_step_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._step_loop())

    async def _step_loop(self) -> None:
        """Step the engine while it has work; route events to the jobs' streams."""
        try:
            while self._engine.has_work:
                events, ran, start, end, stats = await self._compute.call(self._step)
                self._send_positions(stats)
                self._metrics.after_step(stats, stats.last_step_s if ran else None, events)
                for job_id in ran:
                    self._count_step(job_id, start, end)
                for event in events:
                    self._route(event)
        except Exception as exc:  # noqa: BLE001  (an engine bug: fail every waiting stream, not hang)
            for job_id in list(self._streams):
                self._finish(job_id, "failed")
            raise exc

    def _step(self) -> tuple[list, tuple[str, ...], float, float, object]:
        """One engine step (compute thread): (events, ids of the jobs in the forward, start, end,
        ``Engine.stats()`` after the step)."""
        before = self._engine.last_step
        start = time.time()
        events = self._engine.step()
        after = self._engine.last_step
        ran = after.job_ids if after is not None and after is not before else ()
        return events, ran, start, time.time(), self._engine.stats()

    def _send_positions(self, stats) -> None:
        """Tell each queued job's stream its queue position when it changed."""
        for job in stats.jobs:
            if job.queue_position is None or job.job_id not in self._positions:
                continue
            if self._positions[job.job_id] != job.queue_position:
                self._positions[job.job_id] = job.queue_position
                stream = self._streams.get(job.job_id)
                if stream is not None:
                    stream.put_nowait(QueuePosition(job.job_id, job.queue_position))

    def _route(self, event) -> None:
        if isinstance(event, JobAdmitted):
            self._positions.pop(event.job_id, None)
            if event.job_id in self._jobs:
                self._jobs[event.job_id].state = "active"
        elif isinstance(event, JobFinished):
            self._finish(event.job_id, event.state)
        elif isinstance(event, (Progress, LatentChunk)):
            stats = self._jobs.get(event.job_id)
            if stats is not None and isinstance(event, LatentChunk):
                stats.chunks_emitted += 1
            stream = self._streams.get(event.job_id)
            if stream is not None:
                stream.put_nowait(event)

    def _count_step(self, job_id: str, start: float, end: float) -> None:
        stats = self._jobs.get(job_id)
        if stats is not None:
            stats.steps += 1
            stats.step_intervals = (stats.step_intervals + [(start, end)])[-_STEP_HISTORY:]

    def _finish(self, job_id: str, state: str) -> None:
        stats = self._jobs.get(job_id)
        if stats is not None and stats.running:
            stats.state, stats.finished_at = state, time.time()
        stream = self._streams.get(job_id)
        if stream is not None:
            stream.put_nowait(None)

    def _track(self, job_id: str, stats: JobStats) -> JobStats:
        finished = [j for j, s in self._jobs.items() if not s.running]
        for old in finished[: max(0, len(self._jobs) + 1 - _HISTORY)]:
            del self._jobs[old]
        self._jobs[job_id] = stats
        return stats
