"""The DiT engine: many jobs, one packed forward per step (DESIGN.md section 2). Never imports ray.

Multi-job API (continuous batching; the deployment drives it from one compute thread)::

    engine = Engine.from_checkpoint(model_cfg, dit_dir, max_active_jobs=4, queue_limit=16)
    handle = engine.submit(job)          # JobHandle; raises InvalidInput (bad field) or
                                         # EngineBusy (queue full -> RESOURCE_EXHAUSTED, .retry_after_s)
    handle.state, handle.queue_position  # "queued" (position 0 = next) / "active" / "done" ...
    while engine.has_work:
        for event in engine.step():      # one step = every active job's window in ONE forward
            route(event.job_id, event)   # Progress | LatentChunk | JobAdmitted | JobFinished
    engine.cancel(job_id)                # leaves before the next step; KV region back in the pool
    engine.pause(job_id) / engine.resume(job_id)   # sit out the steps (keeps its KV region and slot)
    engine.update_prompt(job_id, start_chunk, caption_embedding)   # InvalidInput("start_chunk")
    engine.snapshot(job_id) -> JobSnapshot; engine.submit(job, resume=snapshot)   # exact resume
    engine.stats() -> EngineStats        # active/queued jobs, KV pool use, step time, TTFC/TPOC
    engine.last_step -> StepInfo         # jobs and tokens of the last forward

Options (``Engine(...)``): ``max_active_jobs``, ``queue_limit``, ``kv_pool_blocks``,
``batch_cfg`` (guidance branches in one forward), ``max_forward_tokens`` (split a step into
forwards of bounded size), ``rope_horizon_chunks`` (RoPE policy for long streams,
:mod:`cluster.scheduler.kv_ring`), ``kv_keep_all`` (reference-style whole-video KV; baseline).
Not thread-safe: call every method from one thread (e.g. the deployment's compute thread).

Scheduling: admission is FIFO and bounded by ``max_active_jobs`` and the KV pool
(:mod:`cluster.scheduler.admission`, a replaceable policy); every active job advances exactly one
step per engine step
(a job's plans do not depend on what else runs), new jobs join at the next step, finished,
cancelled and failed jobs leave at once. A job's chunks are bitwise the same alone or batched
on CPU float32 (every chunk is its own attention group, projections of the condition and the
captions run per window; tests/model/test_engine_batching.py). K/V: a fixed pool allocated at
construction, one region per job (:mod:`stages.dit.kv_pool`, :mod:`cluster.engine.kv_layout`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from cluster.engine import snapshot as snapshots
from cluster.engine.errors import EngineBusy, JobNotFound
from cluster.engine.events import JobHandle, StepInfo, job_events
from cluster.engine.kv_layout import JobKV
from cluster.engine.prepare import JobPreparer, JobState
from cluster.engine.ranks import RankGroup, ShardedForward, ShardedKVPool
from cluster.engine.runner import BatchRunner, StepOutcome
from cluster.engine.stats import EngineStats, Histogram, JobStat
from cluster.messages import CaptionEmbedding, EngineJob, JobAdmitted, JobFinished, LatentChunk
from cluster.scheduler.admission import Admission, QueueFull
from cluster.scheduler.kv_ring import KVRing
from cluster.scheduler.step_plan import EngineStepPlan, JobPlan, plan_step, update_job
from stages.config import ModelConfig
from stages.dit.kv_pool import KVPool
from stages.dit.model import MagiDiT
from stages.errors import InvalidInput

log = logging.getLogger(__name__)
DEFAULT_ROPE_HORIZON_CHUNKS = 32
MIN_RETRY_HINT_S = 0.1  # the retry hint's floor (seconds)


class Engine:
    """Runs jobs on one DiT: on this process's device, or spread over a parallel mesh (``ranks``).

    Args:
        model_cfg: the served model's configuration (sampling settings, geometry, special tokens).
        dit: the loaded DiT.
        device: where latents and K/V live (the DiT must be there already).
        special_tokens: the model's special-token table (see
            :func:`stages.dit.token_table.load_special_tokens`); required when
            ``model_cfg.special_tokens`` prepends anything, ignored otherwise.
        max_active_jobs: jobs batched into one step at most.
        queue_limit: jobs that may wait for admission; more raise :class:`EngineBusy`.
        kv_pool_blocks: KV-pool size in blocks (a block = one chunk at the model's default
            size); default: room for ``max_active_jobs`` default-size jobs.
        batch_cfg: guidance branches in one forward (False: one forward per branch kind).
        rope_horizon_chunks: RoPE re-basing horizon (:mod:`cluster.scheduler.kv_ring`), >=
            window_size + max(noise2clean_kvrange); None = absolute positions (reference).
        kv_keep_all: keep every chunk's K/V (reference behaviour; memory grows with length).
        max_forward_tokens: split a step into forwards of at most this many query tokens
            (bounds activation memory; :mod:`cluster.engine.runner`); None = one forward.
        ranks: run the DiT over a parallel mesh (:mod:`cluster.engine.ranks`); ``dit`` must
            then be ``ranks.local.dit`` (rank 0's shard). None = this process alone.

    Raises:
        ValueError: special tokens enabled but no table given or of the wrong width; a bad limit.
    """

    def __init__(self, model_cfg: ModelConfig, dit: MagiDiT, device: str = "cpu", special_tokens: Any = None, *,
                 max_active_jobs: int = 4, queue_limit: int = 16, kv_pool_blocks: int | None = None,
                 batch_cfg: bool = True, rope_horizon_chunks: int | None = DEFAULT_ROPE_HORIZON_CHUNKS,
                 kv_keep_all: bool = False, max_forward_tokens: int | None = None, ranks: RankGroup | None = None):
        self.model_cfg = model_cfg
        st = model_cfg.special_tokens
        if st.enabled and special_tokens is None:
            raise ValueError(
                f"model {model_cfg.name!r} enables special tokens (special_tokens): pass the table, e.g. "
                "Engine.from_checkpoint(...) or special_tokens=stages.dit.token_table.load_special_tokens(cfg, dit_dir)"
            )
        if st.enabled and special_tokens.dim != dit.cfg.caption_channels:
            raise ValueError(f"special-token width {special_tokens.dim} != caption_channels {dit.cfg.caption_channels}")
        sp = model_cfg.sampling
        if rope_horizon_chunks is not None and rope_horizon_chunks < sp.window_size + max(sp.noise2clean_kvrange, default=1):
            raise ValueError(f"rope_horizon_chunks {rope_horizon_chunks} < window_size + max(noise2clean_kvrange)")
        self.special_tokens = special_tokens if st.enabled else None
        self.dit = dit.to(device).eval()
        self.device = torch.device(device)
        f, cfg = model_cfg.vae_spatial_factor, dit.cfg
        block = self.dit.tokens_per_chunk(sp.chunk_width, model_cfg.height // f, model_cfg.width // f)
        self.preparer = JobPreparer(model_cfg, self.dit, self.device, self.special_tokens, kv_keep_all, block)
        blocks = kv_pool_blocks or max_active_jobs * self.preparer.default_blocks()
        self.ranks = ranks
        if ranks is None:
            self.pool = KVPool(num_layers=cfg.num_layers, num_blocks=blocks, block_tokens=block,
                               num_groups=cfg.num_query_groups, head_dim=cfg.kv_channels,
                               dtype=self.dit.params_dtype, device=self.device)
        else:
            self.pool = ShardedKVPool(ranks, num_blocks=blocks, block_tokens=block)
        self.rope_horizon_chunks = rope_horizon_chunks
        self.runner = BatchRunner(self.dit, sp, self.pool, batch_cfg=batch_cfg, max_forward_tokens=max_forward_tokens,
                                  forward=None if ranks is None else ShardedForward(ranks))
        self._admission = Admission(max_active_jobs, queue_limit, self.pool)
        self._pending: list = []  # lifecycle events produced between steps (cancel, admission at submit)
        self._paused: set[str] = set()  # active jobs left out of the steps (pause / resume)
        self._steps, self._chunks = 0, 0
        self._job_steps = 0  # sum over steps of the jobs in each (for the retry hint)
        self._finished = {"done": 0, "cancelled": 0, "failed": 0}
        self._step_h, self._ttfc_h, self._tpoc_h = Histogram(), Histogram(), Histogram()
        self.last_step: StepInfo | None = None

    @classmethod
    def from_checkpoint(cls, model_cfg: ModelConfig, dit_dir: Path, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, attention: str = "sdpa", **engine_kwargs) -> "Engine":
        """Load the DiT (:func:`stages.dit.weights.load_dit`, distill variant from the sampling
        settings) and its special-token table (:func:`stages.dit.token_table.load_special_tokens`)
        from ``dit_dir`` and build the engine (``engine_kwargs``: see :class:`Engine`). With
        ``ranks`` the DiT is rank 0's shard, already loaded by :class:`cluster.engine.ranks.RankWorker`
        (with its own attention backend). ``attention``: the range-attention backend name
        (:func:`stages.dit.flash_attention.make_attention`: auto, sdpa, flash).

        Raises:
            FileNotFoundError, stages.dit.weights.CheckpointMismatch: see the loaders.
            ValueError, RuntimeError: an unknown attention backend, or "flash" where it cannot run.
        """
        from stages.dit.flash_attention import make_attention  # noqa: PLC0415
        from stages.dit.token_table import load_special_tokens  # noqa: PLC0415
        from stages.dit.weights import load_dit  # noqa: PLC0415

        ranks = engine_kwargs.get("ranks")
        if ranks is not None:
            dit = ranks.local.dit
            device = str(dit.device)
        else:
            dit = load_dit(Path(dit_dir), model_cfg.dit, device=device, dtype=dtype, distill=model_cfg.sampling.distill)
            dit.attention = make_attention(attention, device)
        return cls(model_cfg, dit, device=device, special_tokens=load_special_tokens(model_cfg, Path(dit_dir)),
                   **engine_kwargs)

    # ----- KV regions ------------------------------------------------------------
    def _check_fits(self, st: JobState) -> None:
        """Raises InvalidInput when the job needs more KV-pool blocks than the pool has: the
        field is what makes it large (num_chunks with keep_all KV, the V2V prefix, or the size)."""
        if st.blocks <= self.pool.num_blocks:
            return
        if self.preparer.keep_all:
            name = "num_chunks"
        else:
            name = "prefix_latent" if st.ctx.chunk_offset >= st.areas.history else "height"
        raise InvalidInput(name, f"the job needs {st.blocks} KV-pool blocks, the engine's pool has {self.pool.num_blocks} "
                                 "(Engine kv_pool_blocks)")

    def _activate(self, st: JobState, region) -> None:
        """Give an admitted job its K/V in ``region`` and restore its snapshot, if any."""
        st.ctx.kv = JobKV(self.pool, region, self.dit.tokens_per_chunk(st.ctx.chunk_width, st.ctx.latent_h,
                                                                         st.ctx.latent_w), KVRing(st.areas, self.preparer.keep_all))
        st.state, st.timings.admitted = "active", time.perf_counter()
        if st.resume is not None:
            snapshots.restore(st, st.resume)

    # ----- multi-job API ---------------------------------------------------------
    def submit(self, job: EngineJob, noise: torch.Tensor | None = None, resume: "snapshots.JobSnapshot | None" = None
               ) -> JobHandle:
        """Queue a job; it runs from the next :meth:`step` once admitted (FIFO, bounded by
        ``max_active_jobs`` and the KV pool). ``resume``: continue exactly from a snapshot.

        Raises:
            InvalidInput: a field the engine cannot use (named), a duplicate ``job_id``, or a
                job the KV pool can never hold.
            EngineBusy: the queue is full (RESOURCE_EXHAUSTED; ``retry_after_s`` hint).
        """
        st = self.preparer.prepare(job, noise)
        if st.job_id in self._admission:
            raise InvalidInput("job_id", f"job {st.job_id!r} is already queued or running")
        self._check_fits(st)
        if resume is not None:
            snapshots.check(st, resume)
            st.resume = resume
        try:
            admitted = self._admission.offer(st.job_id, st, st.blocks)
        except QueueFull as full:
            raise EngineBusy(queue_limit=full.queue_limit, active=full.active, queued=full.queued,
                             retry_after_s=self._retry_hint()) from None
        if admitted:
            self._activate(st, self._admission.region(st.job_id))
            self._pending.append(JobAdmitted(st.job_id, 0.0))
        return JobHandle(self, st)

    @property
    def has_work(self) -> bool:
        """True while a step would do something: an active job not paused, a job queued while
        no active job is paused (else only a resume or a job leaving can admit it), or lifecycle
        events waiting to be returned."""
        active = self._admission.active
        runnable = len(active) > len(self._paused) or (self._admission.queued and not self._paused)
        return bool(runnable or self._pending)

    def queue_position(self, job_id: str) -> int | None:
        return self._admission.position(job_id)

    def handle(self, job_id: str) -> JobHandle:
        """Handle of a queued or active job.

        Raises:
            JobNotFound: no such queued or active job.
        """
        st = self._admission.get(job_id)
        if st is None:
            raise JobNotFound(job_id)
        return JobHandle(self, st)

    def step(self) -> list:
        """Admit waiting jobs, then run one step of every active job in ONE packed forward.

        Returns:
            events in order: lifecycle events since the last step, then per job (admission
            order) its ``Progress`` / ``LatentChunk`` events and a ``JobFinished`` if it ended.
            A failing shared forward fails every job of the step (``JobFinished`` "failed");
            a job whose own state is bad fails alone.
        """
        events, self._pending = self._pending, []
        now = time.perf_counter()
        for st in self._admission.admit():
            self._activate(st, self._admission.region(st.job_id))
            events.append(JobAdmitted(st.job_id, now - st.timings.submitted))
        plan, left = self._plan()
        events.extend(left)
        if not plan.jobs:
            return events
        items = [(self._admission.get(jp.job_id), jp) for jp in plan.jobs]
        outcomes, dt = self._execute(items)
        events.extend(self._update(items, outcomes, dt))
        return events

    def _plan(self) -> tuple[EngineStepPlan, list]:
        """plan: the scheduler's step plan over the active jobs not paused
        (:func:`cluster.scheduler.step_plan.plan_step`), and the events of jobs that leave
        without running (finished, or their KV state cannot serve the next window)."""
        runnable = [st for st in self._admission.active if st.job_id not in self._paused]
        plan = plan_step([(st.job_id, st.sched, st.ctx.kv.ring) for st in runnable], self.rope_horizon_chunks)
        events = []
        for job_id in plan.finished:
            st = self._admission.get(job_id)
            events.append(self._finish(st, "cancelled" if st.sched.cancelled else "done"))
        for job_id, err in plan.failed:
            events.append(self._finish(self._admission.get(job_id), "failed", f"{type(err).__name__}: {err}"))
        return plan, events

    def _execute(self, items: list[tuple[JobState, JobPlan]]) -> tuple[list, float]:
        """execute: every planned job in one packed forward (:class:`BatchRunner`); per job its
        outcome or the exception that failed it, and the step's seconds."""
        started = time.perf_counter()
        try:
            outcomes = self.runner.run([(st.ctx, jp) for st, jp in items])
        except Exception as err:  # noqa: BLE001 - the replica survives; the step's jobs fail
            log.exception("engine step failed")
            outcomes = [err] * len(items)
        dt = time.perf_counter() - started
        self._record_step(items, outcomes, dt)
        return outcomes, dt

    def _update(self, items: list[tuple[JobState, JobPlan]], outcomes: list, dt: float) -> list:
        """update: per job the scheduler and KV ring move on
        (:func:`cluster.scheduler.step_plan.update_job`); its events, a ``JobFinished`` if it ended."""
        events = []
        for (st, jp), out in zip(items, outcomes):
            if isinstance(out, BaseException):
                events.append(self._finish(st, "failed", f"{type(out).__name__}: {out}"))
                continue
            update_job(st.sched, st.ctx.kv.ring, jp, out.emitted)
            job_ev = job_events(st, jp.window, out, dt)
            self._observe(job_ev)
            events.extend(job_ev)
            if st.sched.done:
                events.append(self._finish(st, "done"))
        return events

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or active job: it is not part of any later step and its KV region
        is back in the pool when this returns. False if no such job (already gone)."""
        st = self._admission.get(job_id)
        if st is None:
            return False
        st.sched.cancel()
        self._pending.append(self._finish(st, "cancelled"))
        return True

    def pause(self, job_id: str) -> bool:
        """Leave an active job out of the steps from the next one on, keeping its KV region and
        admission slot (e.g. its reader is behind). Its outputs do not change: a job's chunks do
        not depend on when it steps (noise seeded per (seed, chunk), windows per job). False if
        the job is not active here (queued, finished or unknown)."""
        if self._admission.get(job_id) is None or self._admission.position(job_id) is not None:
            return False
        self._paused.add(job_id)
        return True

    def resume(self, job_id: str) -> bool:
        """Put a paused job back into the steps (from the next one). False if it was not paused."""
        if job_id not in self._paused:
            return False
        self._paused.discard(job_id)
        return True

    def update_prompt(self, job_id: str, start_chunk: int, caption: CaptionEmbedding) -> None:
        """Use ``caption`` from generated chunk ``start_chunk`` on (replacing prompt segments
        that start at or after it). Chunks before ``start_chunk`` are unaffected bitwise.

        Raises:
            JobNotFound: no such queued or active job.
            InvalidInput("start_chunk"): a chunk that has already entered the window (its
                denoising started) or past the job's last chunk; InvalidInput("caption"): bad shape.
        """
        st = self._admission.get(job_id)
        if st is None:
            raise JobNotFound(job_id)
        self._update_prompt(st, start_chunk, caption)

    def _update_prompt(self, st: JobState, start_chunk: int, caption: CaptionEmbedding) -> None:
        ctx = st.ctx
        if isinstance(start_chunk, bool) or not isinstance(start_chunk, int) or start_chunk < 0:
            raise InvalidInput("start_chunk", f"must be an integer >= 0, got {start_chunk!r}")
        earliest = ctx.max_started - ctx.chunk_offset + 1
        if start_chunk < earliest:
            raise InvalidInput("start_chunk", f"chunk {start_chunk} is already in flight or done (chunks 0..{earliest - 1} "
                                              f"have started); the earliest chunk a new prompt can start at is {earliest}")
        n = st.sched.num_chunks
        if n is not None and start_chunk >= n - ctx.chunk_offset:
            raise InvalidInput("start_chunk", f"chunk {start_chunk} is past the job's last chunk {n - ctx.chunk_offset - 1}")
        y, mask = self.preparer.caption(caption, "caption")
        ctx.captions.update(start_chunk, y, mask)

    def snapshot(self, job_id: str) -> "snapshots.JobSnapshot":
        """State of an active job between steps, enough to resume it exactly
        (:mod:`cluster.engine.snapshot`).

        Raises:
            JobNotFound: no such job; InvalidInput("job_id"): the job is still queued.
        """
        st = self._admission.get(job_id)
        if st is None:
            raise JobNotFound(job_id)
        return snapshots.take(st)

    def stats(self) -> EngineStats:
        """Snapshot of the engine's state and counters (:class:`cluster.engine.stats.EngineStats`)."""
        jobs = tuple(
            JobStat(st.job_id, st.state, self._admission.position(st.job_id), st.timings.steps, st.timings.chunks,
                    st.timings.ttfc_s, st.timings.tpoc_s, 0 if st.ctx.kv is None else st.ctx.kv.reserved_bytes,
                    paused=st.job_id in self._paused)
            for st in [*self._admission.active, *self._admission.queued]
        )
        pool = self.pool
        return EngineStats(
            active_jobs=len(self._admission.active), queued_jobs=len(self._admission.queued),
            max_active_jobs=self._admission.max_active, queue_limit=self._admission.queue_limit,
            kv_pool_bytes=pool.nbytes, kv_pool_used_bytes=pool.used_blocks * pool.block_tokens * pool.token_bytes,
            kv_pool_blocks=pool.num_blocks, kv_pool_free_blocks=pool.free_blocks, steps=self._steps,
            chunks_produced=self._chunks, jobs_finished=dict(self._finished),
            last_step_s=None if self.last_step is None else self.last_step.duration_s,
            step_s=self._step_h.snapshot(), ttfc_s=self._ttfc_h.snapshot(), tpoc_s=self._tpoc_h.snapshot(), jobs=jobs,
            paused_jobs=len(self._paused),
        )

    def close(self) -> None:
        """Stop the parallel mesh's other ranks (if any). The engine is unusable afterwards."""
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None

    # ----- bookkeeping -----------------------------------------------------------
    def _finish(self, st: JobState, state: str, error: str | None = None) -> JobFinished:
        self._admission.remove(st.job_id)  # gives its region back
        self._paused.discard(st.job_id)
        st.ctx.kv = None
        st.ctx.latents.clear()
        st.state, st.error = state, error
        self._finished[state] += 1
        return JobFinished(st.job_id, state, len(st.sched.emitted), error)

    def _record_step(self, items, outcomes, dt: float) -> None:
        ok = [o for o in outcomes if isinstance(o, StepOutcome)]
        self.last_step = StepInfo(self._steps, dt, tuple(st.job_id for st, _ in items),
                                  sum(len(o.windows) for o in ok), sum(o.tokens for o in ok))
        self._steps += 1
        self._job_steps += len(items)
        self._step_h.observe(dt)

    def _observe(self, events: list) -> None:
        for e in events:
            if isinstance(e, LatentChunk):
                self._chunks += 1
                if "ttfc_s" in e.timings:
                    self._ttfc_h.observe(e.timings["ttfc_s"])
                if "tpoc_s" in e.timings:
                    self._tpoc_h.observe(e.timings["tpoc_s"])

    def _retry_hint(self) -> float:
        """Seconds until the active job closest to finishing is done: its remaining steps times
        the step time of the current batch (the mean step time per job in a step, times the jobs
        active now: batching gains ~nothing on CPU, FIELD-NOTES; on GPU this errs long, never
        into a retry storm); 1 s when unknown."""
        snap = self._step_h.snapshot()
        left = [st.sched.total_forwards - st.sched.steps_done for st in self._admission.active
                if st.sched.total_forwards is not None]
        if not self._job_steps or not left:
            return 1.0
        return max(MIN_RETRY_HINT_S, snap.sum / self._job_steps * len(self._admission.active) * min(left))
