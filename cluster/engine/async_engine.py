"""An asyncio front of the DiT engine, without Ray (the role of vLLM's AsyncLLM over its EngineCore).

:class:`AsyncEngine` wraps the synchronous :class:`cluster.engine.Engine` (not thread-safe):
every engine call runs in ONE compute thread (:class:`cluster.engine.compute.ComputeThread`,
FIFO), so the event loop stays free to stream and to notice cancellation. A step loop task runs
``Engine.step()`` while there is work and routes each job's events to the job's queue::

    engine = AsyncEngine(Engine(...))
    await engine.submit(job)                      # InvalidInput / EngineBusy / JobCancelled
    async for event in engine.events(job_id):     # QueuePosition ... Progress / LatentChunk ...
        ...                                       # ends on done; JobCancelled / JobFailed
    await engine.cancel(job_id) -> bool           # was it queued or running here
    await engine.update_prompt(job_id, start_chunk, caption)
    engine.stats(job_id) -> JobStat | None        # also recently finished jobs

Lifecycle, decided in one place and in order: a job's state moves queued -> active -> done /
cancelled / failed and never back, and only the engine's own events (``JobAdmitted``,
``JobFinished``, in the order ``Engine.step`` returns them) move it; ``cancel`` only asks the
engine (``Engine.cancel`` in the same FIFO thread, after any submit in flight), so a cancel the
engine accepted (``True``) always ends the stream with :class:`JobCancelled`, and a job the
engine finished first ends normally. A bug in the step loop fails every waiting stream
(:class:`JobFailed`) instead of leaving it hanging.

Backpressure: a job whose reader has ``max_buffered_chunks`` clean chunks not yet taken from
its stream is paused in the engine (``Engine.pause``: it keeps its KV region and admission
slot, the steps go on without it, so other jobs keep their pace) and resumed when the reader
takes one (``Engine.resume``); its chunks are the same bitwise. A job paused for
``paused_timeout_s`` is cancelled (its stream ends with :class:`JobCancelled`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import AsyncIterator, Callable

from cluster.config import EngineSettings
from cluster.engine.compute import ComputeThread
from cluster.engine.early_cancels import EarlyCancels
from cluster.engine.errors import JobCancelled, JobFailed, JobNotFound
from cluster.engine.events import JobHandle
from cluster.messages import JobAdmitted, JobFinished
from cluster.engine.loop import Engine
from cluster.engine.job_stream import JobStream
from cluster.engine.stats import EngineStats, JobStat
from cluster.engine.step_result import StepResult, take_step
from cluster.messages import CaptionEmbedding, EngineJob, LatentChunk, Progress, QueuePosition
from stages.errors import InvalidInput

log = logging.getLogger(__name__)
HISTORY = 256  # finished jobs whose stats stay queryable
_DEFAULTS = EngineSettings()  # the one home of the backpressure defaults

#: ``on_step(stats, step_s, events)``: called on the event loop after every engine step with
#: ``Engine.stats()``, the step's wall time in seconds (None if no forward ran) and its events.
StepObserver = Callable[[EngineStats, "float | None", list], None]


class AsyncEngine:
    """Asyncio API over one :class:`Engine` (see the module docstring). Create and use it on one
    event loop; the engine must not be called by anyone else meanwhile.

    Args:
        engine: the engine to drive (its calls all run in this object's compute thread).
        on_step: optional :data:`StepObserver` (e.g. the replica's Prometheus metrics).
        history: finished jobs whose :meth:`stats` stay queryable (oldest forgotten first).
        early_cancels: memory of cancels that came before their job (default: 10 min, 4096 ids).
        max_buffered_chunks: clean chunks a job's reader may leave untaken before the job is
            paused (``engine.max_buffered_chunks``).
        paused_timeout_s: seconds a job may stay paused before it is cancelled
            (``engine.paused_timeout_s``).
    """

    def __init__(self, engine: Engine, on_step: StepObserver | None = None, history: int = HISTORY,
                 early_cancels: EarlyCancels | None = None, *,
                 max_buffered_chunks: int = _DEFAULTS.max_buffered_chunks,
                 paused_timeout_s: float = _DEFAULTS.paused_timeout_s):
        self.engine = engine
        self._max_buffered, self._paused_timeout_s = max_buffered_chunks, paused_timeout_s
        self._on_step = on_step
        self._history = history
        self._early_cancels = early_cancels or EarlyCancels()
        self._compute = ComputeThread("dit-step")
        self._jobs: collections.OrderedDict[str, JobStream] = collections.OrderedDict()
        self._handles: dict[str, JobHandle] = {}  # compute thread only
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    # ----- public API ------------------------------------------------------------
    async def submit(self, job: EngineJob) -> None:
        """Queue ``job`` in the engine; read its events with :meth:`events`.

        Raises:
            stages.errors.InvalidInput: a field the engine cannot use (named), or a ``job_id``
                already queued or running here.
            cluster.engine.EngineBusy: the admission queue is full (``retry_after_s``).
            cluster.engine.JobCancelled: :meth:`cancel` named this job before it came.
            asyncio.CancelledError: the caller went away; the job (if the engine took it) is
                cancelled before its next step.
        """
        job_id = job.spec.job_id
        known = self._jobs.get(job_id)
        if known is not None and not known.ended:
            raise InvalidInput("job_id", f"job {job_id!r} is already queued or running")
        rec = self._remember(JobStream(job_id, self._max_buffered))
        if self._early_cancels.consume(job_id):  # cancel(job_id) came first: never start it
            rec.end("cancelled")
            raise JobCancelled(job_id)
        submitted = self._compute.submit(self._submit, job)
        try:
            rec.total_forwards, position = await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(lambda f: self._abandon(rec, f))
            raise
        except BaseException:
            self._forget(rec)  # refused: no stats
            raise
        if position is not None and rec.state == "queued":
            rec.send_position(position)
        self._kick()

    async def events(self, job_id: str) -> AsyncIterator[QueuePosition | Progress | LatentChunk]:
        """The events of a submitted job, in the engine's order: :class:`QueuePosition` while it
        waits (when queued and whenever its position changes), then ``Progress`` per denoising
        step and ``LatentChunk`` (float32 (C, T, H, W) scaled latent) per clean chunk. Ends
        normally when the job is done. Read it once; leaving it early cancels the job; not
        reading pauses it (see the module docstring).

        Raises:
            JobNotFound: no such job here. JobCancelled: :meth:`cancel` stopped the job.
            JobFailed: the engine failed the job (its message says why).
        """
        rec = self._jobs.get(job_id)
        if rec is None:
            raise JobNotFound(job_id)
        finished = False
        try:
            while (event := await rec.queue.get()) is not None:
                if rec.took(event):
                    self._resume(rec)
                yield event
            finished = True
        finally:
            if not finished and not rec.ended:  # the consumer went away: stop the engine's work
                self._cancel_soon(job_id)
        if rec.state == "cancelled":
            raise JobCancelled(job_id)
        if rec.state == "failed":
            raise JobFailed(job_id, rec.error)

    async def cancel(self, job_id: str) -> bool:
        """Cancel ``job_id`` (idempotent): it leaves the engine before its next step, its KV region
        returns to the pool and its stream ends with :class:`JobCancelled`. A job id not seen
        here is remembered (see :class:`EarlyCancels`) and refused when it comes; a finished job
        is left alone. Returns whether the engine held the job (then its stream ends cancelled)."""
        rec = self._jobs.get(job_id)
        if rec is None:
            self._early_cancels.add(job_id)
            return False
        if rec.ended:
            return False
        held = await self._compute.call(self.engine.cancel, job_id)
        self._kick()  # the engine's JobFinished("cancelled") comes out of its next step
        return held

    async def update_prompt(self, job_id: str, start_chunk: int, caption: CaptionEmbedding) -> None:
        """:meth:`cluster.engine.Engine.update_prompt` in the compute thread (same errors:
        JobNotFound, InvalidInput "start_chunk" / "caption")."""
        await self._compute.call(self.engine.update_prompt, job_id, start_chunk, caption)

    async def engine_stats(self) -> EngineStats:
        """``Engine.stats()`` taken in the compute thread."""
        return await self._compute.call(self.engine.stats)

    def stats(self, job_id: str) -> JobStat | None:
        """A queued, running or recently finished job's record, or None."""
        rec = self._jobs.get(job_id)
        return None if rec is None else rec.stat()

    def active_jobs(self) -> list[str]:
        """Ids of the jobs queued or running here."""
        return [job_id for job_id, rec in self._jobs.items() if not rec.ended]

    async def close(self) -> None:
        """Stop the step loop and the compute thread (the engine is left as it is)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._compute.close()

    # ----- compute thread --------------------------------------------------------
    def _submit(self, job: EngineJob) -> tuple[int | None, int | None]:
        handle = self.engine.submit(job)
        self._handles[job.spec.job_id] = handle
        return handle.total_forwards, handle.queue_position

    # ----- event loop ------------------------------------------------------------
    def _kick(self) -> None:
        """Make the step loop run (start it on first use)."""
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.create_task(self._step_loop())
        self._wake.set()

    async def _step_loop(self) -> None:
        """Step while the engine has work; sleep until kicked. An engine bug fails the waiting jobs."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                has_work = True
                while has_work:
                    result = await self._compute.call(take_step, self.engine, self._handles)
                    self._apply(result)
                    has_work = result.has_work
            except Exception as exc:  # noqa: BLE001 - a bug: fail every waiting stream, do not hang
                log.exception("DiT engine step loop failed; failing every queued and running job")
                self._fail_all(f"engine step failed ({type(exc).__name__})")

    def _apply(self, result: StepResult) -> None:
        start, end = result.interval
        for job_id in result.ran:
            rec = self._jobs.get(job_id)
            if rec is not None and not rec.ended:
                rec.ran_step(start, end, result.timings.get(job_id, rec.timings))
        for event in result.events:
            self._route(event)
        for job in result.stats.jobs:
            rec = self._jobs.get(job.job_id)
            if rec is not None and not rec.ended:
                rec.kv_bytes = job.kv_bytes
                if rec.state == "queued" and job.queue_position is not None:
                    rec.send_position(job.queue_position)
        if self._on_step is not None:
            self._on_step(result.stats, result.stats.last_step_s if result.ran else None, result.events)

    def _route(self, event) -> None:
        rec = self._jobs.get(event.job_id)
        if rec is None or rec.ended:
            return
        if isinstance(event, JobAdmitted):
            rec.admitted()
        elif isinstance(event, JobFinished):
            rec.end(event.state, event.error)
        elif isinstance(event, (Progress, LatentChunk)):
            rec.chunks += isinstance(event, LatentChunk)
            if rec.put(event):
                self._pause(rec)

    def _pause(self, rec: JobStream) -> None:
        """The reader is behind: the engine leaves the job out from its next step (FIFO)."""
        timer = asyncio.get_running_loop().call_later(self._paused_timeout_s, self._paused_too_long, rec)
        rec.set_paused(True, timer)
        self._soon(self.engine.pause, rec.job_id)

    def _resume(self, rec: JobStream) -> None:
        rec.set_paused(False)
        self._soon(self.engine.resume, rec.job_id)
        self._kick()

    def _paused_too_long(self, rec: JobStream) -> None:
        if rec.paused and not rec.ended:
            log.warning("job %s: paused %.0f s (its reader took nothing; engine.paused_timeout_s): cancelled",
                        rec.job_id, self._paused_timeout_s)
            self._cancel_soon(rec.job_id)

    def _cancel_soon(self, job_id: str) -> None:
        """Cancel in the engine without waiting (after every call already submitted)."""
        self._soon(self.engine.cancel, job_id)
        self._kick()

    def _soon(self, call: Callable[[str], bool], job_id: str) -> None:
        """``call(job_id)`` in the compute thread after every call already submitted, unawaited."""
        self._compute.submit(call, job_id).add_done_callback(lambda f: f.exception())

    def _abandon(self, rec: JobStream, submitted: asyncio.Future) -> None:
        """The submitter went away during its submit: cancel the job if the engine took it."""
        if submitted.cancelled() or submitted.exception() is not None:
            self._forget(rec)
        else:
            self._cancel_soon(rec.job_id)

    def _fail_all(self, reason: str) -> None:
        for rec in list(self._jobs.values()):
            if not rec.ended:
                rec.end("failed", reason)
                self._soon(self.engine.cancel, rec.job_id)

    def _remember(self, rec: JobStream) -> JobStream:
        finished = [job_id for job_id, r in self._jobs.items() if r.ended]
        for old in finished[: max(0, len(self._jobs) + 1 - self._history)]:
            del self._jobs[old]
        self._jobs.pop(rec.job_id, None)
        self._jobs[rec.job_id] = rec
        return rec

    def _forget(self, rec: JobStream) -> None:
        if self._jobs.get(rec.job_id) is rec:
            del self._jobs[rec.job_id]
