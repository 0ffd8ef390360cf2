"""Executes one engine step: the plans of any number of jobs in one packed DiT forward.

For every (job, plan): build the window and its guidance branches
(:mod:`cluster.engine.windows`), then run ALL branch windows of ALL jobs as one
:meth:`stages.dit.model.MagiDiT.forward_packed` over the engine's KV pool (continuous
batching; guidance branches batched), then per job combine the branches
(:func:`stages.sampling.combine_cfg3` / :func:`stages.sampling.distill_blend`), Euler-update
every DENOISE slot (reference ``SampleTransport.integrate_velocity``), commit the clean
chunks' K/V (written in place by the forward) and release the ring below ``kv_keep_from``.

``batch_cfg=False`` runs one forward per branch kind instead (the sequential-branch
baseline of ``bench/batching.py``; same windows, same outputs). ``max_forward_tokens``
splits a step's windows into several forwards of at most that many query tokens (a window
is never split): it bounds a step's activation memory however many jobs are active, and on
CPUs with small caches keeps the working set in cache; outputs are the same bitwise.

RoPE position policy (streams longer than the training horizon). The reference uses
absolute time positions (frame index over the whole video). Positions here are taken
relative to ``ctx.rope_base`` (a global chunk, initially 0, so every job that stays within
``rope_horizon_chunks`` chunks gets exactly the reference's absolute positions). When a
window would end more than ``rope_horizon_chunks`` chunks past the base, the base jumps to
the plan's ``kv_keep_from`` (the oldest chunk any query can still see) and the keys of the
held ring chunks are rotated back by the jump (:meth:`stages.dit.model.MagiDiT.rope_time_shift`;
RoPE composes, so every query/key pair keeps its position difference). Time positions thus
stay below ``rope_horizon_chunks * chunk_width`` latent frames for any stream length. Departure
from the reference beyond the horizon: float32 rounding of the rotated ring keys (about
1e-7 relative) and of the table's ``T_total`` rescale quirk. The unconditional branch's
positions restart at 0 for every chunk as in the reference. ``None`` = absolute positions.
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
from cluster.scheduler.plan import StepPlan
from stages.config import SamplingConfig
from stages.dit.kv_pool import KVPool
from stages.dit.model import MagiDiT
from stages.dit.packed import PackedWindow
from stages.sampling import combine_cfg3, distill_blend, euler_step

BRANCHES = ("main", "text", "uncond")


@dataclass
class StepOutcome:
    """``emitted``: global chunk -> clean latent (C, frames, h, w) float32 CPU; ``windows``:
    branch windows run; ``tokens``: query tokens of the job's windows."""

    emitted: dict[int, torch.Tensor] = field(default_factory=dict)
    windows: tuple[str, ...] = ()
    tokens: int = 0


class BatchRunner:
    """Runs the plans of several jobs as one engine step.

    Args:
        dit: the model; sampling: guidance / distillation settings; pool: the KV pool.
        batch_cfg: all branches in one forward (default) or one forward per branch kind.
        rope_horizon_chunks: RoPE re-basing horizon (module docstring); None = absolute.
        max_forward_tokens: query-token budget of one forward (module docstring); None = one
            forward per step.
        forward: the packed forward ``(windows, pool) -> velocities``; default
            ``dit.forward_packed`` (a parallel mesh passes :class:`cluster.engine.ranks.ShardedForward`).
    """

    def __init__(self, dit: MagiDiT, sampling: SamplingConfig, pool: KVPool, *, batch_cfg: bool = True,
                 rope_horizon_chunks: int | None = None, max_forward_tokens: int | None = None,
                 forward: Callable[[list[PackedWindow], KVPool], list[torch.Tensor]] | None = None):
        self.dit, self.sampling, self.pool = dit, sampling, pool
        self.forward_packed = forward or dit.forward_packed
        self.builder = WindowBuilder(dit, sampling)
        self.batch_cfg = batch_cfg
        self.max_forward_tokens = max_forward_tokens
        self.rope_horizon_chunks = rope_horizon_chunks

    @torch.no_grad()
    def run(self, items: list[tuple[JobContext, StepPlan]]) -> list[StepOutcome | BaseException]:
        """Execute one plan per job in one step; per job its :class:`StepOutcome`, or the
        exception that failed that job alone (building its window). An exception of the
        shared forward propagates (every job of the step failed).
        """
        steps: list[JobStep | BaseException] = []
        for ctx, plan in items:
            try:
                self._rope_policy(ctx, plan)
                steps.append(self.builder.job_step(plan, ctx))
            except Exception as err:  # noqa: BLE001 - isolates one job's bad state from the batch
                steps.append(err)
        live = [s for s in steps if isinstance(s, JobStep)]
        self._forward(live)
        return [s if isinstance(s, BaseException) else self._finish(s) for s in steps]

    def _forward(self, steps: list[JobStep]) -> None:
        kinds = [BRANCHES] if self.batch_cfg else [(b,) for b in BRANCHES]
        for kind in kinds:
            for part in self._split([(s, name) for s in steps for name in kind if name in s.branches]):
                out = self.forward_packed([s.branches[name] for s, name in part], self.pool)
                for (s, name), v in zip(part, out):
                    s.velocity[name] = v

    def _split(self, todo: list[tuple[JobStep, str]]) -> list[list[tuple[JobStep, str]]]:
        """Forwards of the token budget (:func:`cluster.scheduler.forwards.split_forwards`)."""
        groups = split_forwards([s.branches[name].k * s.win.tpc for s, name in todo], self.max_forward_tokens)
        return [[todo[i] for i in group] for group in groups]

    def _rope_policy(self, ctx: JobContext, plan: StepPlan) -> None:
        horizon = self.rope_horizon_chunks
        if horizon is None or plan.slots[-1].chunk + 1 - ctx.rope_base <= horizon:
            return
        jump = plan.kv_keep_from - ctx.rope_base
        if jump <= 0:
            return
        frames = jump * ctx.chunk_width
        ctx.kv.shift_keys(self.dit.rope_shift(frames))  # picklable: runs on every rank's shard
        ctx.rope_base = plan.kv_keep_from

    # ----- per job after the forward ---------------------------------------------
    def _combine(self, s: JobStep) -> torch.Tensor:
        cw, n, win = s.ctx.chunk_width, s.n, s.win
        main = s.velocity["main"]
        if self.sampling.cfg_number == 3:
            if n == 0:
                return main
            cond = main[:, -n * cw :]
            text = s.velocity["text"][:, -n * cw :] if "text" in s.velocity else torch.zeros_like(cond)
            uncond = s.velocity.get("uncond", torch.zeros_like(cond))
            mixed = combine_cfg3(uncond, cond, text, s.prev_scale, s.text_scale, chunk_width=cw)
            return torch.cat([main[:, : -n * cw], mixed], dim=1)
        if not s.extra:
            return main
        k = win.k
        j = k - n
        seg = slice(j * cw, (j + 1) * cw)
        v = main[:, : k * cw].clone()
        v[:, seg] = distill_blend(v[:, seg], main[:, k * cw :], self.sampling.prev_chunks_scale)
        return v

    def _finish(self, s: JobStep) -> StepOutcome:
        ctx, plan, win, n = s.ctx, s.plan, s.win, s.n
        velocity = self._combine(s)
        ctx.kv.commit(plan)
        names = tuple(b for b in BRANCHES if b in s.branches)
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
