"""Model-input windows of one job's step and its guidance branches as packed windows.

Reference ``SampleTransport.forward_velocity`` (window assembly, ``try_pad_prefix_video``) and
``VideoDiTModel.forward_dispatcher`` / ``forward_3cfg`` (branches). Each branch of a job's
step becomes one :class:`stages.dit.packed.PackedWindow`; the engine packs the windows of all
branches of all active jobs into one DiT forward (:mod:`cluster.engine.runner`).

Branches (the K/V locations come from the job's :class:`cluster.engine.kv_layout.JobKV`):

* cfg_number 3: ``main`` = ``cond_prev`` (null caption + history, adaLN null row -1, K/V
  persisted), ``text`` = ``cond_prev_text`` (captions + history, row -2), ``uncond`` (every
  DENOISE chunk alone, null caption, RoPE restarting at 0, row -1). A branch whose guidance
  weight is 0 for every chunk (text_scale 0; prev_chunk_scale 1 for ``uncond``) is left out:
  it contributes ``0 * v`` to :func:`stages.sampling.combine_cfg3`.
* cfg_number 1: ``main`` (captions + history, row -2, K/V persisted); when
  ``plan.distill_nearly_clean_chunk``, a self-only copy of the first DENOISE chunk is
  appended to the same window (RoPE positions continue after the window, a reference quirk).
The clean re-forward and prefix chunks always get the null caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.engine.job import JobContext
from cluster.scheduler.plan import ChunkSlot, SlotRole, StepPlan
from stages.config import SamplingConfig
from stages.dit.model import MagiDiT
from stages.dit.packed import PackedWindow
from stages.sampling import cfg_scales, distill_step_size


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
    """One job's share of an engine step: its window, branch windows and, after the
    forward, their velocities (``velocity[name]`` (C, T_branch, h, w))."""

    ctx: JobContext
    plan: StepPlan
    win: Window
    n: int
    branches: dict[str, PackedWindow] = field(default_factory=dict)
    prev_scale: torch.Tensor | None = None
    text_scale: torch.Tensor | None = None
    extra: bool = False
    velocity: dict[str, torch.Tensor] = field(default_factory=dict)


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

    def window(self, plan: StepPlan, ctx: JobContext) -> Window:
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
        return Window(slots, x, t.to(self.device), self.tokens_per_chunk(ctx), (first - ctx.rope_base) * cw)

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
    def job_step(self, plan: StepPlan, ctx: JobContext) -> JobStep:
        """The window and the branch windows of ``plan`` (see module docstring).

        Raises:
            RuntimeError: the plan reads K/V the job does not hold, or DENOISE slots do not
                close the window.
        """
        ctx.kv.prepare(plan)
        win = self.window(plan, ctx)
        den = plan.denoise_slots
        n = len(den)
        if [s.chunk for s in win.slots[win.k - n :]] != [s.chunk for s in den]:
            raise RuntimeError(f"plan {plan.global_step}: DENOISE slots must close the window")
        step = JobStep(ctx, plan, win, n)
        if self.sampling.cfg_number == 3:
            self._cfg3(step)
        else:
            self._cfg1(step)
        return step

    def _captions(self, step: JobStep, null: bool) -> tuple[torch.Tensor, torch.Tensor]:
        book = step.ctx.captions
        pairs = [book.caption(s.chunk) if (s.role is SlotRole.DENOISE and not null) else (book.null_y, book.null_mask)
                 for s in step.win.slots]
        return (torch.stack([p[0] for p in pairs]).to(self.device), torch.stack([p[1] for p in pairs]).to(self.device))

    def _distill_dt(self, step: JobStep, k: int) -> torch.Tensor | None:
        """(k,) float32 step size of a distilled model (:func:`stages.sampling.distill_step_size`)."""
        if not self.sampling.distill:
            return None
        dt = distill_step_size(step.ctx.num_steps, step.plan.distill_interval)
        return torch.full((k,), dt, dtype=torch.float32, device=self.device)

    def _full(self, step: JobStep, *, null: bool, dropout: bool, text: bool) -> PackedWindow:
        win, kv = step.win, step.ctx.kv
        y, mask = self._captions(step, null)
        if text:
            ranges = [kv.text_ranges(s, win.first) for s in win.slots]
            dest = [kv.text_pos(i) for i in range(win.k)]
        else:
            ranges = [kv.main_ranges(s) for s in win.slots]
            dest = [kv.main_pos(s.chunk) for s in win.slots]
        return PackedWindow(
            x=win.x, t=win.t, y=y, y_mask=mask, caption_dropout=torch.full((win.k,), dropout, dtype=torch.bool),
            key_ranges=ranges, kv_dest=dest, segments=((win.k, win.rope_offset),), distill_dt=self._distill_dt(step, win.k),
        )

    def _cfg3(self, step: JobStep) -> None:
        step.branches["main"] = self._full(step, null=True, dropout=True, text=False)
        n, win, ctx = step.n, step.win, step.ctx
        if n == 0:
            return
        sp = self.sampling
        p, s = cfg_scales(win.t[-n:].cpu(), sp.cfg_t_range, sp.prev_chunk_scales, sp.text_scales)
        step.prev_scale, step.text_scale = p, s
        if bool((s != 0).any()):
            step.branches["text"] = self._full(step, null=False, dropout=False, text=True)
        if bool((p != 1).any()):
            cw, tpc, kv = ctx.chunk_width, win.tpc, ctx.kv
            book = ctx.captions
            step.branches["uncond"] = PackedWindow(
                x=win.x[:, -n * cw :], t=win.t[-n:], y=book.null_y.expand(n, -1, -1).to(self.device),
                y_mask=book.null_mask.expand(n, -1).to(self.device), caption_dropout=torch.ones(n, dtype=torch.bool),
                key_ranges=[[(kv.uncond_pos(j), kv.uncond_pos(j) + tpc)] for j in range(n)],
                kv_dest=[kv.uncond_pos(j) for j in range(n)], segments=((1, 0),) * n, distill_dt=self._distill_dt(step, n),
            )

    def _cfg1(self, step: JobStep) -> None:
        main = self._full(step, null=False, dropout=False, text=False)
        win, n, kv = step.win, step.n, step.ctx.kv
        if step.plan.distill_nearly_clean_chunk and n > 0:
            j, cw = win.k - n, step.ctx.chunk_width  # first DENOISE slot (reference slice_start)
            seg = slice(j * cw, (j + 1) * cw)
            main = PackedWindow(
                x=torch.cat([main.x, main.x[:, seg]], dim=1), t=torch.cat([main.t, main.t[j : j + 1]]),
                y=torch.cat([main.y, main.y[j : j + 1]]), y_mask=torch.cat([main.y_mask, main.y_mask[j : j + 1]]),
                caption_dropout=torch.cat([main.caption_dropout, main.caption_dropout[j : j + 1]]),
                key_ranges=[*main.key_ranges, [(kv.extra_pos(), kv.extra_pos() + win.tpc)]],
                kv_dest=[*main.kv_dest, kv.extra_pos()], segments=((win.k + 1, win.rope_offset),),
                distill_dt=self._distill_dt(step, win.k + 1),
            )
            step.extra = True
        step.branches["main"] = main
