"""Executes one engine step: the job plans of an :class:`cluster.scheduler.step_plan.EngineStepPlan`
in one packed DiT forward.

For every job: make the plan's KV moves and RoPE key rotation (:mod:`cluster.scheduler.kv_ring`),
build the window and its guidance branches (:mod:`cluster.engine.windows`), then run ALL branch
windows of ALL jobs as one :meth:`stages.dit.model.MagiDiT.forward_packed` over the engine's KV
pool (continuous batching; guidance branches batched), then per job combine the branches
(:func:`stages.sampling.guided_velocity`) and Euler-update every DENOISE slot (reference
``SampleTransport.integrate_velocity``). The clean chunks' K/V are written in place by the
forward; the engine's update step records them (:func:`cluster.scheduler.step_plan.update_job`).

``batch_cfg=False`` runs one forward per branch kind instead (the sequential-branch
baseline of ``bench/batching.py``; same windows, same outputs). ``max_forward_tokens``
splits a step's windows into several forwards of at most that many query tokens (a window
is never split): it bounds a step's activation memory however many jobs are active, and on
CPUs with small caches keeps the working set in cache; outputs are the same bitwise.
The unconditional branch's RoPE positions restart at 0 for every chunk as in the reference.
The duration special token of an open-ended stream counts as 8 or more chunks remaining
(:func:`stages.text_encoder.special_tokens.special_token_keys`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cluster.engine.job import JobContext
from cluster.engine.windows import JobStep, WindowBuilder
from cluster.scheduler.forwards import split_forwards
from cluster.scheduler.step_plan import JobPlan
from stages.config import SamplingConfig
from stages.dit.kv_pool import KVPool
from stages.dit.model import MagiDiT
from stages.dit.packed import PackedWindow
from stages.sampling import Branch, euler_step, guided_velocity


@dataclass
class StepOutcome:
    """``emitted``: global chunk -> clean latent (C, frames, h, w) float32 CPU; ``windows``:
    branch windows run; ``tokens``: query tokens of the job's windows."""

    emitted: dict[int, torch.Tensor] = field(default_factory=dict)
    windows: tuple[Branch, ...] = ()
    tokens: int = 0


class BatchRunner:
    """Runs the plans of several jobs as one engine step.

    Args:
        dit: the model; sampling: guidance / distillation settings; pool: the KV pool.
        batch_cfg: all branches in one forward (default) or one forward per branch kind.
        max_forward_tokens: query-token budget of one forward (module docstring); None = one
            forward per step.
        forward: the packed forward ``(windows, pool) -> velocities``; default
            ``dit.forward_packed`` (a parallel mesh passes :class:`cluster.engine.ranks.ShardedForward`).
    """

    def __init__(self, dit: MagiDiT, sampling: SamplingConfig, pool: KVPool, *, batch_cfg: bool = True,
                 max_forward_tokens: int | None = None,
                 forward: Callable[[list[PackedWindow], KVPool], list[torch.Tensor]] | None = None):
        self.dit, self.sampling, self.pool = dit, sampling, pool
        self.forward_packed = forward or dit.forward_packed
        self.builder = WindowBuilder(dit, sampling)
        self.batch_cfg = batch_cfg
        self.max_forward_tokens = max_forward_tokens

    @torch.no_grad()
    def run(self, items: list[tuple[JobContext, JobPlan]]) -> list[StepOutcome | BaseException]:
        """Execute one plan per job in one step; per job its :class:`StepOutcome`, or the
        exception that failed that job alone (its KV moves or window). An exception of the
        shared forward propagates (every job of the step failed).
        """
        steps: list[JobStep | BaseException] = []
        for ctx, jp in items:
            try:
                self._kv_moves(ctx, jp)
                steps.append(self.builder.job_step(jp, ctx))
            except Exception as err:  # noqa: BLE001 - isolates one job's bad state from the batch
                steps.append(err)
        live = [s for s in steps if isinstance(s, JobStep)]
        self._forward(live)
        return [s if isinstance(s, BaseException) else self._finish(s) for s in steps]

    def _kv_moves(self, ctx: JobContext, jp: JobPlan) -> None:
        """The plan's chunk copies, then the held keys' RoPE rotation (:mod:`cluster.scheduler.kv_ring`)."""
        ctx.kv.move(jp.kv_moves)
        if jp.rope_jump:
            ctx.kv.shift_keys(self.dit.rope_shift(jp.rope_jump * ctx.chunk_width))  # picklable: runs on every rank

    def _forward(self, steps: list[JobStep]) -> None:
        kinds = [tuple(Branch)] if self.batch_cfg else [(b,) for b in Branch]
        for kind in kinds:
            for part in self._split([(s, name) for s in steps for name in kind if name in s.branches]):
                out = self.forward_packed([s.branches[name] for s, name in part], self.pool)
                for (s, name), v in zip(part, out):
                    s.velocity[name] = v

    def _split(self, todo: list[tuple[JobStep, Branch]]) -> list[list[tuple[JobStep, Branch]]]:
        """Forwards of the token budget (:func:`cluster.scheduler.forwards.split_forwards`)."""
        groups = split_forwards([s.branches[name].k * s.win.tpc for s, name in todo], self.max_forward_tokens)
        return [[todo[i] for i in group] for group in groups]

    # ----- per job after the forward ---------------------------------------------
    def _finish(self, s: JobStep) -> StepOutcome:
        ctx, plan, win, n = s.ctx, s.plan, s.win, s.n
        velocity = guided_velocity(s.guidance, s.velocity, n, ctx.chunk_width, self.sampling.prev_chunks_scale)
        names = tuple(s.branches)
        tokens = sum(w.k for w in s.branches.values()) * win.tpc
        if plan.denoise_slots:
            ctx.max_started = max(ctx.max_started, plan.denoise_slots[-1].chunk)
        if plan.is_prefix_extraction or n == 0:
            return StepOutcome(windows=names, tokens=tokens)
        cw, den = ctx.chunk_width, plan.denoise_slots
        x_new = euler_step(win.x[:, -n * cw :], velocity[:, -n * cw :], [d.t for d in den], [d.t_next for d in den])
        for i, d in enumerate(den):
            ctx.latents[d.chunk] = x_new[:, i * cw : (i + 1) * cw].clone()
        emitted = {c: ctx.emitted_frames(c) for c in plan.emits}
        oldest = den[0].chunk
        for c in [c for c in ctx.latents if c < oldest]:
            del ctx.latents[c]
        return StepOutcome(emitted=emitted, windows=names, tokens=tokens)
