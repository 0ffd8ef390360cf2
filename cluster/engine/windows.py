"""Model-input windows of one job's step and its guidance branches as packed windows.

Reference ``SampleTransport.forward_velocity`` (window assembly, ``try_pad_prefix_video``). Which
guidance branches run is decided by :func:`stages.sampling.select_branches`; each becomes one
:class:`stages.dit.packed.PackedWindow` here, with the K/V slots of the job's
:class:`cluster.scheduler.kv_ring.KVRing` (areas named in :mod:`cluster.scheduler.kv_areas`):

* the history branch (:func:`stages.sampling.history_branch`) reads and writes ``history``;
* ``cond_prev_text`` of cfg 3 reads the ring from ``history`` and writes its window to ``text``;
* ``uncond``: every denoising chunk alone (RoPE restarting at 0) in ``uncond``;
* cfg 1 with ``self_only``: a self-only copy of the first denoising chunk is appended to the
  history window (RoPE positions continue after the window, a reference quirk), in ``self_only``.

Denoising chunks get the caption in ``cond_prev_text`` and the null caption elsewhere; the clean
re-forward and prefix chunks always get the null caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.engine.job import JobContext
from cluster.scheduler.plan import ChunkSlot, SlotRole, StepPlan
from cluster.scheduler.step_plan import JobPlan
from stages.config import SamplingConfig
from stages.dit.model import MagiDiT
from stages.dit.packed import PackedWindow
from stages.sampling import Branch, Guidance, distill_step_size, history_branch, select_branches


@dataclass
class Window:
    """Model-input window of one plan.

    Attributes:
        slots: the plan's chunk slots; x: (C, K * chunk_width, h, w) latents (prefix frames
        written in); t: (K,) float32 model timesteps; tpc: tokens per chunk;
        rope_offset: RoPE time position (latent frames) of the window's first frame.
    """

    slots: tuple[ChunkSlot, ...]
    x: torch.Tensor
    t: torch.Tensor
    tpc: int
    rope_offset: int

    @property
    def k(self) -> int:
        return len(self.slots)

    @property
    def first(self) -> int:
        return self.slots[0].chunk


@dataclass
class JobStep:
    """One job's share of an engine step: its window, the guidance it runs, the branch windows
    and, after the forward, their velocities (``velocity[branch]`` (C, T_branch, h, w))."""

    ctx: JobContext
    plan: StepPlan
    win: Window
    n: int
    guidance: Guidance
    branches: dict[Branch, PackedWindow] = field(default_factory=dict)
    velocity: dict[Branch, torch.Tensor] = field(default_factory=dict)


class WindowBuilder:
    """Builds :class:`JobStep` s (window + branch windows) for one DiT.

    Args:
        dit: the model (device, geometry); sampling: guidance / distillation settings.
    """

    def __init__(self, dit: MagiDiT, sampling: SamplingConfig):
        self.dit, self.sampling = dit, sampling
        self.device = dit.device

    def tokens_per_chunk(self, ctx: JobContext) -> int:
        return self.dit.tokens_per_chunk(ctx.chunk_width, ctx.latent_h, ctx.latent_w)

    # ----- window -----------------------------------------------------------------
    def _slot_latent(self, slot: ChunkSlot, ctx: JobContext) -> torch.Tensor:
        cw = ctx.chunk_width
        if slot.role is SlotRole.PREFIX:
            return ctx.prefix[:, slot.chunk * cw : (slot.chunk + 1) * cw].to(self.device, torch.float32)
        if slot.chunk not in ctx.latents:
            if slot.role is not SlotRole.DENOISE:
                raise RuntimeError(f"job {ctx.job_id}: no latent for clean re-forward chunk {slot.chunk}")
            ctx.latents[slot.chunk] = ctx.noise.chunk(slot.chunk, self.device)
        return ctx.latents[slot.chunk]

    def window(self, plan: StepPlan, ctx: JobContext, rope_base: int) -> Window:
        """Assemble the window (reference steps 3-6 of ``forward_velocity``).

        Raises:
            RuntimeError: window chunks not consecutive, or a clean chunk's latent missing.
        """
        slots, cw = plan.slots, ctx.chunk_width
        first = slots[0].chunk
        if [s.chunk for s in slots] != list(range(first, first + len(slots))):
            raise RuntimeError(f"plan {plan.global_step}: window chunks {[s.chunk for s in slots]} not consecutive")
        x = torch.cat([self._slot_latent(s, ctx) for s in slots], dim=1).clone()
        t = torch.tensor([s.t for s in slots], dtype=torch.float32)
        if not plan.is_prefix_extraction:
            self._pad_prefix(x, t, first * cw, ctx)
        return Window(slots, x, t.to(self.device), self.tokens_per_chunk(ctx), (first - rope_base) * cw)

    @staticmethod
    def _pad_prefix(x: torch.Tensor, t: torch.Tensor, start: int, ctx: JobContext) -> None:
        """Reference ``try_pad_prefix_video``: overwrite the window's leading frames with the
        prefix latent; whole prefix chunks in the window get t = 1.0."""
        p = ctx.prefix_frames
        if p <= start:
            return
        n = min(p - start, x.shape[1])
        x[:, :n] = ctx.prefix[:, start : start + n].to(x.device, x.dtype)
        whole = (p - start) // ctx.chunk_width
        if whole > 0:
            t[:whole] = 1.0

    # ----- branches ---------------------------------------------------------------
    def job_step(self, jp: JobPlan, ctx: JobContext) -> JobStep:
        """The window and the branch windows of ``jp`` (see module docstring).

        Raises:
            RuntimeError: a clean chunk's latent is missing, or DENOISE slots do not close the window.
        """
        plan = jp.window
        win = self.window(plan, ctx, jp.rope_base)
        den = plan.denoise_slots
        n = len(den)
        if [s.chunk for s in win.slots[win.k - n :]] != [s.chunk for s in den]:
            raise RuntimeError(f"plan {plan.global_step}: DENOISE slots must close the window")
        g = select_branches(self.sampling, win.t[win.k - n :], plan.distill_nearly_clean_chunk)
        step = JobStep(ctx, plan, win, n, g)
        for b in g.branches:
            if b is history_branch(g.cfg_number):
                step.branches[b] = self._history(step, b)
            elif b is Branch.COND_PREV_TEXT:
                step.branches[b] = self._full(step, b, [ctx.kv.ring.text_ranges(s.kv_range, win.first) for s in win.slots],
                                              [ctx.kv.ring.text_slot(i) for i in range(win.k)])
            else:
                step.branches[b] = self._uncond(step)
        return step

    def _captions(self, step: JobStep, branch: Branch) -> tuple[torch.Tensor, torch.Tensor]:
        book = step.ctx.captions
        pairs = [book.caption(s.chunk) if (s.role is SlotRole.DENOISE and branch.uses_caption) else (book.null_y, book.null_mask)
                 for s in step.win.slots]
        return (torch.stack([p[0] for p in pairs]).to(self.device), torch.stack([p[1] for p in pairs]).to(self.device))

    def _distill_dt(self, step: JobStep, k: int) -> torch.Tensor | None:
        """(k,) float32 step size of a distilled model (:func:`stages.sampling.distill_step_size`)."""
        if not self.sampling.distill:
            return None
        dt = distill_step_size(step.ctx.num_steps, step.plan.distill_interval)
        return torch.full((k,), dt, dtype=torch.float32, device=self.device)

    def _full(self, step: JobStep, branch: Branch, slot_ranges: list, dest_slots: list[int]) -> PackedWindow:
        """Window of ``branch`` over the whole window (history or text branch)."""
        win, kv = step.win, step.ctx.kv
        y, mask = self._captions(step, branch)
        return PackedWindow(
            x=win.x, t=win.t, y=y, y_mask=mask,
            caption_dropout=torch.full((win.k,), not branch.uses_caption, dtype=torch.bool),
            key_ranges=[kv.token_ranges(r) for r in slot_ranges], kv_dest=[kv.pos(d) for d in dest_slots],
            segments=((win.k, win.rope_offset),), distill_dt=self._distill_dt(step, win.k),
        )

    def _history(self, step: JobStep, branch: Branch) -> PackedWindow:
        """The history branch's window; cfg 1 with ``self_only``: plus the self-only copy of the
        first denoising chunk (reference ``slice_start``)."""
        win, n, ring = step.win, step.n, step.ctx.kv.ring
        w = self._full(step, branch, [ring.history_ranges(s.kv_range) for s in win.slots],
                       [ring.history_slot(s.chunk) for s in win.slots])
        if not step.guidance.self_only:
            return w
        kv, j, cw = step.ctx.kv, win.k - n, step.ctx.chunk_width
        seg, one = slice(j * cw, (j + 1) * cw), slice(j, j + 1)
        pos = kv.pos(ring.self_only_slot())
        return PackedWindow(
            x=torch.cat([w.x, w.x[:, seg]], dim=1), t=torch.cat([w.t, w.t[one]]), y=torch.cat([w.y, w.y[one]]),
            y_mask=torch.cat([w.y_mask, w.y_mask[one]]), caption_dropout=torch.cat([w.caption_dropout, w.caption_dropout[one]]),
            key_ranges=[*w.key_ranges, [(pos, pos + win.tpc)]], kv_dest=[*w.kv_dest, pos],
            segments=((win.k + 1, win.rope_offset),), distill_dt=self._distill_dt(step, win.k + 1),
        )

    def _uncond(self, step: JobStep) -> PackedWindow:
        """``uncond``: every denoising chunk alone, null caption, RoPE from 0."""
        n, win, ctx = step.n, step.win, step.ctx
        cw, tpc, kv, book = ctx.chunk_width, win.tpc, ctx.kv, ctx.captions
        pos = [kv.pos(kv.ring.uncond_slot(j)) for j in range(n)]
        return PackedWindow(
            x=win.x[:, -n * cw :], t=win.t[-n:], y=book.null_y.expand(n, -1, -1).to(self.device),
            y_mask=book.null_mask.expand(n, -1).to(self.device), caption_dropout=torch.ones(n, dtype=torch.bool),
            key_ranges=[[(p, p + tpc)] for p in pos], kv_dest=pos, segments=((1, 0),) * n,
            distill_dt=self._distill_dt(step, n),
        )
