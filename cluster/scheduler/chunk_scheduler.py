"""Per-job chunk scheduler: emits one StepPlan per DiT forward (plain Python, no torch).

Reproduces the reference ``SampleTransport.walk`` order of forwards
(``generate_sequences`` staggering, clean re-forward, KV ranges, V2V prefix
extraction first; DESIGN.md section 3) as a plan -> execute -> update loop:

    sched = ChunkScheduler(num_chunks=..., window_size=4, num_steps=N,
                           t_schedule=init_t(N).tolist(), distill_intervals=init_intervals(N))
    while (plan := sched.next_plan()) is not None:
        emitted = runner.execute(plan)           # forward + Euler update
        sched.update(StepResult(plan.global_step, emitted))

Chunk indices are global (prefix chunks included). ``num_chunks=None`` walks
an endless stream that only stops on :meth:`ChunkScheduler.cancel`; its plans
equal those of a finite job for every forward whose window has not reached the
finite job's last chunk. ``StepPlan.kv_keep_from`` is the lower edge of a
bounded per-job KV ring: no later plan reads a chunk below it.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.scheduler.plan import StepPlan, StepResult
from cluster.scheduler.stagger import StaggerSpec


class SchedulerProtocolError(RuntimeError):
    """next_plan()/update() called out of order, or a StepResult that does not match its plan."""


class ChunkScheduler:
    """Plans the forwards of one job (reference ``SampleTransport``, one ``infer_idx``).

    Args:
        num_chunks: chunks incl. the ``chunk_offset`` prefix chunks (reference
            ``chunk_num``), or None for an endless stream.
        window_size: W, chunks in flight; ``num_steps`` must be a multiple of it.
        num_steps: N, denoising steps per chunk.
        t_schedule: N + 1 timesteps, ``stages.sampling.init_t(N, mode).tolist()``.
        distill_intervals: N multipliers, ``stages.sampling.init_intervals(N, mode)``.
        chunk_offset: whole V2V prefix chunks (KV only; extracted by a first
            ``is_prefix_extraction`` plan; never emitted).
        noise2clean_kvrange, clean_chunk_kvrange, clean_t,
        distill_nearly_clean_chunk_threshold: reference ``runtime_config`` /
            ``engine_config`` settings (see :class:`cluster.scheduler.stagger.StaggerSpec`).

    Raises:
        stages.errors.InvalidInput: a setting is out of range (the message names it).
    """

    def __init__(
        self,
        *,
        num_chunks: int | None,
        window_size: int,
        num_steps: int,
        t_schedule: Sequence[float],
        distill_intervals: Sequence[float],
        chunk_offset: int = 0,
        noise2clean_kvrange: Sequence[int] = (5, 4, 3, 2),
        clean_chunk_kvrange: int = 1,
        clean_t: float = 0.9999,
        distill_nearly_clean_chunk_threshold: float = 0.3,
    ):
        self._spec = StaggerSpec(
            num_chunks=num_chunks,
            window_size=window_size,
            num_steps=num_steps,
            t_schedule=tuple(float(t) for t in t_schedule),
            distill_intervals=tuple(float(x) for x in distill_intervals),
            chunk_offset=chunk_offset,
            noise2clean_kvrange=tuple(noise2clean_kvrange),
            clean_chunk_kvrange=clean_chunk_kvrange,
            clean_t=float(clean_t),
            distill_nearly_clean_chunk_threshold=float(distill_nearly_clean_chunk_threshold),
        )
        self._prefix_pending = chunk_offset > 0
        self._next_step = 0
        self._outstanding: StepPlan | None = None
        self._cancelled = False
        self._emitted: list[int] = []

    # ----- settings ----------------------------------------------------------
    @property
    def spec(self) -> StaggerSpec:
        return self._spec

    @property
    def num_chunks(self) -> int | None:
        return self._spec.num_chunks

    @property
    def chunk_offset(self) -> int:
        return self._spec.chunk_offset

    @property
    def total_forwards(self) -> int | None:
        """Denoising forwards of the job, per * (num_chunks + W - 1 - chunk_offset); None if endless.

        The V2V prefix extraction forward is not counted (reference ``total_forward_step``).
        """
        return self._spec.total_forwards

    # ----- progress ----------------------------------------------------------
    @property
    def steps_done(self) -> int:
        """Denoising forwards executed and reported by :meth:`update`."""
        return self._next_step

    @property
    def emitted(self) -> tuple[int, ...]:
        """Global indices of the chunks emitted so far, in order."""
        return tuple(self._emitted)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        """True once cancelled, or once every forward of a finite job has been updated."""
        if self._cancelled:
            return True
        total = self._spec.total_forwards
        return total is not None and self._next_step >= total and not self._prefix_pending

    # ----- loop --------------------------------------------------------------
    def next_plan(self) -> StepPlan | None:
        """The next forward to execute, or None when the job is finished or cancelled.

        Raises:
            SchedulerProtocolError: the previous plan has not been passed to :meth:`update`.
        """
        if self.done:
            return None
        if self._outstanding is not None:
            raise SchedulerProtocolError(
                f"next_plan() called again before update() for global_step {self._outstanding.global_step}"
            )
        keep = self._spec.keep_from(self._next_step)
        if self._prefix_pending:  # slice_point 0: nothing below it, and it writes chunks 0 .. offset - 1
            plan = self._spec.prefix_plan(kv_keep_from=0)
        else:
            plan = self._spec.plan(self._next_step, kv_keep_from=keep)
        self._outstanding = plan
        return plan

    def update(self, result: StepResult) -> None:
        """Record that the outstanding plan ran; ``result.emitted`` must equal ``plan.emits``.

        Accepted after :meth:`cancel` for a plan handed out before it (no effect on ``done``).

        Raises:
            SchedulerProtocolError: no plan is outstanding, or the result's
                global_step / emitted chunks differ from the plan's.
        """
        plan = self._outstanding
        if plan is None:
            raise SchedulerProtocolError("update() called without an outstanding plan (call next_plan() first)")
        if result.global_step != plan.global_step:
            raise SchedulerProtocolError(
                f"StepResult.global_step {result.global_step} does not match the plan's {plan.global_step}"
            )
        if tuple(result.emitted) != plan.emits:
            raise SchedulerProtocolError(
                f"StepResult.emitted {tuple(result.emitted)} differs from plan.emits {plan.emits} "
                f"(global chunk indices) at global_step {plan.global_step}"
            )
        self._outstanding = None
        if plan.is_prefix_extraction:
            self._prefix_pending = False
        else:
            self._next_step += 1
        self._emitted.extend(plan.emits)

    def cancel(self) -> None:
        """Stop the job: from now on :meth:`next_plan` returns None and :attr:`done` is True."""
        self._cancelled = True
