"""Single-job API of the engine: :class:`JobRun` runs one job on its own (a batch of one).

Kept for callers that drive one job at a time (the first DiT deployment, the golden parity
tests); the multi-job API is :class:`cluster.engine.loop.Engine` ``submit`` / ``step``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

from cluster.engine.prepare import JobState
from cluster.engine.runner import BatchRunner, StepOutcome
from cluster.messages import CaptionEmbedding, LatentChunk, Progress
from cluster.scheduler.plan import StepPlan, StepResult


def job_events(st: JobState, plan: StepPlan, out: StepOutcome, step_s: float) -> list:
    """Progress (+ LatentChunk per emitted chunk) of one job's step; records its timings."""
    ctx, events = st.ctx, []
    st.timings.steps += 1
    den = plan.denoise_slots
    if den:
        events.append(Progress(st.job_id, den[0].chunk - ctx.chunk_offset, den[0].step_index + 1, ctx.num_steps))
    now = time.perf_counter()
    for chunk, latent in out.emitted.items():
        timings = {"dit_step_s": step_s, **st.timings.chunk(now)}
        events.append(LatentChunk(st.job_id, chunk - ctx.chunk_offset, latent, timings))
    return events


class JobRun:
    """One job run on its own (single-job API). Create with :meth:`Engine.start`.

    Attributes:
        job_id, num_chunks (None = endless), total_forwards (None if endless),
        last_outcome: the most recent :class:`StepOutcome` (window input / velocity, for tracing).
    """

    def __init__(self, st: JobState, runner: BatchRunner, release: Callable[[JobState], None],
                 update_prompt: Callable[[JobState, int, CaptionEmbedding], None]):
        self._runner, self._update_prompt, self._st = runner, update_prompt, st
        self._ctx, self._sched = st.ctx, st.sched
        self.job_id = st.job_id
        self.num_chunks = st.sched.num_chunks if st.sched.num_chunks is None else st.sched.num_chunks - st.ctx.chunk_offset
        self._closed = False
        self._finalizer = weakref.finalize(self, release, st)

    @property
    def last_outcome(self) -> StepOutcome | None:
        return self._st.last_outcome

    @property
    def total_forwards(self) -> int | None:
        return self._sched.total_forwards

    @property
    def done(self) -> bool:
        return self._closed or self._sched.done

    @property
    def kv_chunks(self) -> list[int]:
        """Global chunks whose K/V the job currently holds (the bounded ring)."""
        return [] if self._ctx.kv is None else self._ctx.kv.chunks

    @property
    def kv_nbytes(self) -> int:
        return 0 if self._ctx.kv is None else self._ctx.kv.held_bytes

    def step(self) -> list[Progress | LatentChunk]:
        """Run one plan -> execute -> update of this job alone; returns its events (empty when
        done): a ``Progress`` per denoising step (``chunk`` = oldest chunk in flight relative
        to the first generated chunk, ``step`` 1..num_steps; none for the V2V prefix
        extraction), then a ``LatentChunk`` per chunk that became clean (float32 (C, T, h, w)
        CPU; the first chunk after a V2V prefix with leftover frames has them cut). The KV
        region is released after the last step.

        Raises:
            RuntimeError: the plan needs a latent or cached K/V the job does not hold (bug).
        """
        if self.done:
            return []
        plan = self._sched.next_plan()
        if plan is None:
            self.close()
            return []
        started = time.perf_counter()
        out = self._runner.run([(self._ctx, plan)])[0]
        if isinstance(out, BaseException):
            self._sched.cancel()
            self.close()
            raise out
        self._sched.update(StepResult(global_step=plan.global_step, emitted=tuple(out.emitted)))
        self._st.last_outcome = out
        events = job_events(self._st, plan, out, time.perf_counter() - started)
        if self._sched.done:
            self.close()
        return events

    def update_prompt(self, start_chunk: int, caption: CaptionEmbedding) -> None:
        """See :meth:`Engine.update_prompt`."""
        self._update_prompt(self._st, start_chunk, caption)

    def cancel(self) -> None:
        """Stop the job now and release its memory."""
        self._sched.cancel()
        self.close()

    def close(self) -> None:
        """Release the job's KV region and latents (idempotent)."""
        self._closed = True
        self._finalizer()
        self._ctx.latents.clear()
