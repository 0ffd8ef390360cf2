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

import time
from pathlib import Path
from typing import Any

import torch

from cluster.engine import snapshot as snapshots
from cluster.engine.build import check_options, load_parts, make_pool
from cluster.engine.checks import check_fits, check_start_chunk
from cluster.engine.counters import MIN_RETRY_HINT_S, EngineCounters, engine_stats
from cluster.engine.errors import EngineBusy, JobNotFound
from cluster.engine.events import JobHandle, StepInfo
from cluster.engine.kv_layout import JobKV
from cluster.engine.prepare import JobPreparer, JobState
from cluster.engine.ranks import RankGroup, ShardedForward
from cluster.engine.runner import BatchRunner
from cluster.engine.stats import EngineStats
from cluster.engine.stepping import plan_jobs, run_forward, update_jobs
from cluster.messages import CaptionEmbedding, EngineJob, JobAdmitted, JobFinished
from cluster.scheduler.admission import Admission, QueueFull
from cluster.scheduler.kv_ring import KVRing
from stages.config import ModelConfig
from stages.dit.model import MagiDiT
from stages.errors import InvalidInput

DEFAULT_ROPE_HORIZON_CHUNKS = 32
__all__ = ["DEFAULT_ROPE_HORIZON_CHUNKS", "MIN_RETRY_HINT_S", "Engine"]  # MIN_RETRY_HINT_S: cluster.engine.counters


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
        check_options(model_cfg, dit, special_tokens, rope_horizon_chunks)
        self.model_cfg, sp = model_cfg, model_cfg.sampling
        self.special_tokens = special_tokens if model_cfg.special_tokens.enabled else None
        self.dit = dit.to(device).eval()
        self.device = torch.device(device)
        f = model_cfg.vae_spatial_factor
        block = self.dit.tokens_per_chunk(sp.chunk_width, model_cfg.height // f, model_cfg.width // f)
        self.preparer = JobPreparer(model_cfg, self.dit, self.device, self.special_tokens, kv_keep_all, block)
        blocks = kv_pool_blocks or max_active_jobs * self.preparer.default_blocks()
        self.ranks = ranks
        self.pool = make_pool(self.dit, self.device, blocks, block, ranks)
        self.rope_horizon_chunks = rope_horizon_chunks
        self.runner = BatchRunner(self.dit, sp, self.pool, batch_cfg=batch_cfg, max_forward_tokens=max_forward_tokens,
                                  forward=None if ranks is None else ShardedForward(ranks))
        self._admission = Admission(max_active_jobs, queue_limit, self.pool)
        self._pending: list = []  # lifecycle events produced between steps (cancel, admission at submit)
        self._paused: set[str] = set()  # active jobs left out of the steps (pause / resume)
        self._counters = EngineCounters()

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
        dit, device, special_tokens = load_parts(model_cfg, dit_dir, device, dtype, attention, engine_kwargs.get("ranks"))
        return cls(model_cfg, dit, device=device, special_tokens=special_tokens, **engine_kwargs)

    @property
    def last_step(self) -> StepInfo | None:
        """Jobs and tokens of the last forward (:class:`StepInfo`), None before the first."""
        return self._counters.last_step

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
        check_fits(st, self.pool.num_blocks, self.preparer.keep_all)
        if resume is not None:
            snapshots.check(st, resume)
            st.resume = resume
        try:
            admitted = self._admission.offer(st.job_id, st, st.blocks)
        except QueueFull as full:
            raise EngineBusy(queue_limit=full.queue_limit, active=full.active, queued=full.queued,
                             retry_after_s=self._counters.retry_hint(self._admission.active)) from None
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
        runnable = [st for st in self._admission.active if st.job_id not in self._paused]
        plan = plan_jobs(runnable, self.rope_horizon_chunks, self._finish, events)
        if not plan.jobs:
            return events
        items = [(self._admission.get(jp.job_id), jp) for jp in plan.jobs]
        outcomes, dt = run_forward(self.runner, items, self._counters)
        update_jobs(items, outcomes, dt, self._counters, self._finish, events)
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
        check_start_chunk(st, start_chunk)
        y, mask = self.preparer.caption(caption, "caption")
        st.ctx.captions.update(start_chunk, y, mask)

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
        return engine_stats(self._admission, self.pool, self._paused, self._counters)

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
        self._counters.finished[state] += 1
        return JobFinished(st.job_id, state, len(st.sched.emitted), error)
