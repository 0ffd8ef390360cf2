"""Executes one :class:`~cluster.scheduler.plan.StepPlan` of one job (plain torch).

Reference ``SampleTransport.forward_velocity`` + ``VideoDiTModel.forward_dispatcher`` +
``SampleTransport.integrate_velocity``: build the model-input window from the job's
latents (prefix latents written in as ``try_pad_prefix_video`` does), run the CFG
branches, combine them (:mod:`stages.sampling`), Euler-update every DENOISE slot,
persist the K/V of ``plan.kv_write_chunks`` and release K/V below ``plan.kv_keep_from``.

Branches (each one :class:`~stages.dit.model.MagiDiT` forward):

* cfg_number 3: ``cond_prev_text`` (captions + history, K/V not kept), ``cond_prev``
  (null caption + history; the branch whose K/V are persisted), ``uncond`` (every
  DENOISE chunk alone, null caption, RoPE restarting at 0). A branch whose guidance
  weight is 0 for every chunk (text_scale 0, or prev_chunk_scale 1 for ``uncond``) is
  skipped: it contributes ``0 * v`` to the combine, so the result is unchanged.
* cfg_number 1: one forward (captions + history, K/V persisted); when
  ``plan.distill_nearly_clean_chunk``, a self-only copy of the first DENOISE chunk is
  appended (RoPE positions continue after the window, a reference quirk) and blended
  0.7 / 0.3 (:func:`stages.sampling.distill_blend`).
The clean re-forward and prefix chunks always get the null caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.engine.job import JobContext
from cluster.scheduler.plan import ChunkSlot, SlotRole, StepPlan
from stages.config import SamplingConfig
from stages.dit.model import DiTInput, MagiDiT
from stages.sampling import cfg_scales, combine_cfg3, distill_blend, euler_step


@dataclass
class Window:
    """Model-input window of one plan.

    Attributes:
        x: (C, K * chunk_width, h, w) latents (prefix frames written in).
        t: (K,) float32 model timesteps.
        kv_range: (K, 2) int64 token ranges over [history | window].
        history: per-layer cached K/V or None; hist_tokens: its length.
        rope_offset: latent frame index of the window's first frame.
    """

    slots: tuple[ChunkSlot, ...]
    x: torch.Tensor
    t: torch.Tensor
    kv_range: torch.Tensor
    history: list | None
    hist_tokens: int
    rope_offset: int
    tpc: int

    @property
    def k(self) -> int:
        return len(self.slots)

    def index(self, chunk: int) -> int:
        return chunk - self.slots[0].chunk


@dataclass
class StepOutcome:
    """``emitted``: global chunk -> clean latent (C, frames, h, w) float32 CPU; ``x_in`` /
    ``velocity``: the window input and combined velocity (for tracing; velocity None for
    prefix extraction)."""

    emitted: dict[int, torch.Tensor] = field(default_factory=dict)
    x_in: torch.Tensor | None = None
    velocity: torch.Tensor | None = None


class StepRunner:
    """Runs plans of any job on one DiT.

    Args:
        dit: the model (its device is used for all tensors).
        sampling: guidance / distillation settings.
    """

    def __init__(self, dit: MagiDiT, sampling: SamplingConfig):
        self.dit = dit
        self.sampling = sampling
        self.device = next(dit.parameters()).device

    # ----- window -----------------------------------------------------------
    def _tokens_per_chunk(self, ctx: JobContext) -> int:
        cfg = self.dit.cfg
        return (ctx.chunk_width // cfg.t_patch_size) * (ctx.latent_h // cfg.patch_size) * (ctx.latent_w // cfg.patch_size)

    def _slot_latent(self, slot: ChunkSlot, ctx: JobContext) -> torch.Tensor:
        cw = ctx.chunk_width
        if slot.role is SlotRole.PREFIX:
            return ctx.prefix[:, slot.chunk * cw : (slot.chunk + 1) * cw].to(self.device, torch.float32)
        if slot.chunk not in ctx.latents:
            if slot.role is not SlotRole.DENOISE:
                raise RuntimeError(f"job {ctx.job_id}: no latent for clean re-forward chunk {slot.chunk}")
            ctx.latents[slot.chunk] = ctx.noise.chunk(slot.chunk, self.device)
        return ctx.latents[slot.chunk]

    def build_window(self, plan: StepPlan, ctx: JobContext) -> Window:
        """Assemble the window (reference steps 3-6 of ``forward_velocity``)."""
        slots, cw, tpc = plan.slots, ctx.chunk_width, self._tokens_per_chunk(ctx)
        first = slots[0].chunk
        if [s.chunk for s in slots] != list(range(first, first + len(slots))):
            raise RuntimeError(f"plan {plan.global_step}: window chunks {[s.chunk for s in slots]} not consecutive")
        x = torch.cat([self._slot_latent(s, ctx) for s in slots], dim=1).clone()
        t = torch.tensor([s.t for s in slots], dtype=torch.float32)
        if not plan.is_prefix_extraction:
            self._pad_prefix(x, t, first * cw, ctx)
        hist_start = min(first, *(s.kv_range[0] for s in slots))
        history = ctx.kv.history(hist_start, first)
        kv = torch.tensor([[(a - hist_start) * tpc, (b - hist_start) * tpc] for a, b in (s.kv_range for s in slots)])
        return Window(slots, x, t.to(self.device), kv, history, (first - hist_start) * tpc, first * cw, tpc)

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

    # ----- model calls ------------------------------------------------------
    def _distill_dt(self, plan: StepPlan, ctx: JobContext, k: int) -> torch.Tensor | None:
        """Reference ``get_embedding_and_meta`` (engine_config.distill): dt = num_steps / 4 * 2,
        or 4 / distill_interval * 2 for the 12-step shortcut schedule."""
        if not self.sampling.distill:
            return None
        factor = 4 / plan.distill_interval * 2 if ctx.num_steps == 12 else ctx.num_steps / 4 * 2
        return torch.full((k,), factor, dtype=torch.float32, device=self.device)

    def _captions(self, win: Window, ctx: JobContext, null: bool) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [
            ctx.captions.caption(s.chunk) if (s.role is SlotRole.DENOISE and not null) else (ctx.captions.null_y, ctx.captions.null_mask)
            for s in win.slots
        ]
        y = torch.stack([p[0] for p in pairs]).to(self.device)
        return y, torch.stack([p[1] for p in pairs]).to(self.device)

    def _forward(self, win: Window, plan: StepPlan, ctx: JobContext, *, null: bool, dropout: bool, write: bool):
        y, mask = self._captions(win, ctx, null)
        return self.dit(
            DiTInput(
                x=win.x, t=win.t, y=y, y_mask=mask, kv_range=win.kv_range,
                caption_dropout=torch.full((win.k,), dropout, dtype=torch.bool, device=self.device),
                segments=((win.k, win.rope_offset),), distill_dt=self._distill_dt(plan, ctx, win.k),
                history=win.history, return_kv=tuple(win.index(c) for c in plan.kv_write_chunks) if write else (),
            )
        )

    def _uncond(self, win: Window, plan: StepPlan, ctx: JobContext, n: int) -> torch.Tensor:
        """Every DENOISE chunk alone (reference ``forward_3cfg`` third branch)."""
        cw, tpc = ctx.chunk_width, win.tpc
        y, mask = ctx.captions.null_y, ctx.captions.null_mask
        out = self.dit(
            DiTInput(
                x=win.x[:, -n * cw :], t=win.t[-n:], y=y.expand(n, -1, -1).to(self.device),
                y_mask=mask.expand(n, -1).to(self.device),
                kv_range=torch.tensor([[i * tpc, (i + 1) * tpc] for i in range(n)]),
                caption_dropout=torch.ones(n, dtype=torch.bool, device=self.device),
                segments=((1, 0),) * n, distill_dt=self._distill_dt(plan, ctx, n),
            )
        )
        return out.velocity

    def _persist(self, plan: StepPlan, ctx: JobContext, kv: dict) -> None:
        win_first = plan.slots[0].chunk
        for c in plan.kv_write_chunks:
            ctx.kv.put(c, kv[c - win_first])

    def _cfg3(self, win: Window, plan: StepPlan, ctx: JobContext, n: int) -> torch.Tensor:
        sp = self.sampling
        c_p = self._forward(win, plan, ctx, null=True, dropout=True, write=True)
        self._persist(plan, ctx, c_p.kv)
        if n == 0:
            return c_p.velocity
        cw = ctx.chunk_width
        p, s = cfg_scales(win.t[-n:].cpu(), sp.cfg_t_range, sp.prev_chunk_scales, sp.text_scales)
        cond = c_p.velocity[:, -n * cw :]
        text = (
            self._forward(win, plan, ctx, null=False, dropout=False, write=False).velocity[:, -n * cw :]
            if bool((s != 0).any()) else torch.zeros_like(cond)
        )
        uncond = self._uncond(win, plan, ctx, n) if bool((p != 1).any()) else torch.zeros_like(cond)
        return torch.cat([c_p.velocity[:, : -n * cw], combine_cfg3(uncond, cond, text, p, s, chunk_width=cw)], dim=1)

    def _cfg1(self, win: Window, plan: StepPlan, ctx: JobContext, n: int) -> torch.Tensor:
        cw, k = ctx.chunk_width, win.k
        if not (plan.distill_nearly_clean_chunk and n > 0):
            out = self._forward(win, plan, ctx, null=False, dropout=False, write=True)
            self._persist(plan, ctx, out.kv)
            return out.velocity
        j = k - n  # first DENOISE slot (reference slice_start)
        seg = slice(j * cw, (j + 1) * cw)
        tok = win.hist_tokens + k * win.tpc
        ext = Window(
            win.slots + (win.slots[j],), torch.cat([win.x, win.x[:, seg]], dim=1), torch.cat([win.t, win.t[j : j + 1]]),
            torch.cat([win.kv_range, torch.tensor([[tok, tok + win.tpc]])]), win.history, win.hist_tokens,
            win.rope_offset, win.tpc,
        )
        out = self._forward(ext, plan, ctx, null=False, dropout=False, write=True)
        self._persist(plan, ctx, out.kv)
        v = out.velocity[:, : k * cw].clone()
        v[:, seg] = distill_blend(v[:, seg], out.velocity[:, k * cw :], self.sampling.prev_chunks_scale)
        return v

    # ----- step -------------------------------------------------------------
    @torch.no_grad()
    def execute(self, plan: StepPlan, ctx: JobContext) -> StepOutcome:
        """Run ``plan`` for ``ctx``: forward(s), Euler update, KV persist/release, emitted chunks.

        Raises:
            RuntimeError: the plan needs a latent or cached K/V the job does not hold.
        """
        win = self.build_window(plan, ctx)
        den = plan.denoise_slots
        n = len(den)
        if [s.chunk for s in win.slots[win.k - n :]] != [s.chunk for s in den]:
            raise RuntimeError(f"plan {plan.global_step}: DENOISE slots must close the window")
        velocity = (self._cfg3 if self.sampling.cfg_number == 3 else self._cfg1)(win, plan, ctx, n)
        ctx.kv.drop_before(plan.kv_keep_from)
        if plan.is_prefix_extraction or n == 0:
            return StepOutcome(x_in=win.x, velocity=None)
        cw = ctx.chunk_width
        x_new = euler_step(win.x[:, -n * cw :], velocity[:, -n * cw :], [s.t for s in den], [s.t_next for s in den])
        for i, s in enumerate(den):
            ctx.latents[s.chunk] = x_new[:, i * cw : (i + 1) * cw].clone()
        emitted = {c: ctx.emitted_frames(c) for c in plan.emits}
        oldest = den[0].chunk
        for c in [c for c in ctx.latents if c < oldest]:
            del ctx.latents[c]
        return StepOutcome(emitted=emitted, x_in=win.x, velocity=velocity)
