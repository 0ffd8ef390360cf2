"""Turns an :class:`cluster.messages.EngineJob` into engine state: validated geometry, captions
per chunk, noise, scheduler and the KV areas it needs (plain torch, no Ray).

All input errors surface here, at submit time, as :class:`stages.errors.InvalidInput` naming
the field; nothing a job brings can fail later inside a shared engine step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cluster.engine.job import CaptionBook, JobContext, NoiseSource, fit_caption
from cluster.engine.stats import JobTimings
from cluster.messages import EngineJob
from cluster.scheduler.chunk_scheduler import ChunkScheduler
from cluster.scheduler.chunks import prefix_split
from cluster.scheduler.kv_areas import KVAreas, default_job_areas, job_blocks, kv_areas
from cluster.scheduler.plan import StepResult
from stages.config import ModelConfig
from stages.dit.model import LATENT_CHANNELS, MagiDiT
from stages.errors import InvalidInput
from stages.sampling import init_intervals, init_t


@dataclass
class JobState:
    """Engine-side state of one job (queued, active or finished).

    Attributes:
        ctx: tensors and KV of the job; sched: its chunk scheduler; areas: KV areas it needs;
        blocks: pool blocks of its region; timings: clock; state: "queued", "active",
        "done", "cancelled" or "failed"; error: failure text; resume: snapshot to restore on
        admission (:mod:`cluster.engine.snapshot`).
    """

    ctx: JobContext
    sched: ChunkScheduler
    areas: KVAreas
    blocks: int
    timings: JobTimings = field(default_factory=JobTimings)
    state: str = "queued"
    error: str | None = None
    resume: Any = None

    @property
    def job_id(self) -> str:
        return self.ctx.job_id


class JobPreparer:
    """Validates jobs and builds :class:`JobState` s for one engine.

    Args:
        model_cfg: the served model; dit: the DiT; device: tensor device;
        special_tokens: the special-token table or None; keep_all: reference-style KV
        (every chunk kept); block_tokens: tokens per KV-pool block.
    """

    def __init__(self, model_cfg: ModelConfig, dit: MagiDiT, device: torch.device, special_tokens: Any,
                 keep_all: bool, block_tokens: int):
        self.model_cfg, self.dit, self.device = model_cfg, dit, device
        self.special_tokens, self.keep_all, self.block_tokens = special_tokens, keep_all, block_tokens

    def prepare(self, job: EngineJob, noise: torch.Tensor | None = None) -> JobState:
        """Build the job's state (nothing allocated in the KV pool yet).

        Raises:
            InvalidInput: a field the engine cannot use (named in the error).
        """
        spec, mc = job.spec, self.model_cfg
        sp = mc.sampling
        if spec.num_steps <= 0 or spec.num_steps % sp.window_size:
            raise InvalidInput("num_steps", f"must be a positive multiple of window_size {sp.window_size}, got {spec.num_steps}")
        step = mc.vae_spatial_factor * self.dit.cfg.patch_size
        if spec.height <= 0 or spec.width <= 0 or spec.height % step or spec.width % step:
            raise InvalidInput("height", f"height and width must be positive multiples of {step}, got {spec.height}x{spec.width}")
        h, w = spec.height // mc.vae_spatial_factor, spec.width // mc.vae_spatial_factor
        prefix = self._prefix(job.prefix_latent, h, w)
        offset, _ = prefix_split(0 if prefix is None else prefix.shape[1], sp.chunk_width)
        if spec.num_chunks is not None and spec.num_chunks <= 0:
            raise InvalidInput("num_chunks", f"must be positive, got {spec.num_chunks}")
        total = None if spec.num_chunks is None else offset + spec.num_chunks
        noise = self._noise(noise, (LATENT_CHANNELS, sp.chunk_width, h, w), total)
        ctx = JobContext(
            job_id=spec.job_id, chunk_width=sp.chunk_width, latent_h=h, latent_w=w,
            noise=NoiseSource(spec.seed, (LATENT_CHANNELS, sp.chunk_width, h, w), noise),
            captions=self.captions(job, offset, spec.num_chunks), prefix=prefix, chunk_offset=offset,
            num_steps=spec.num_steps,
        )
        sched = ChunkScheduler(
            num_chunks=total, window_size=sp.window_size, num_steps=spec.num_steps,
            t_schedule=init_t(spec.num_steps, sp.shortcut_mode).tolist(),
            distill_intervals=init_intervals(spec.num_steps, sp.shortcut_mode), chunk_offset=offset,
            noise2clean_kvrange=sp.noise2clean_kvrange, clean_chunk_kvrange=sp.clean_chunk_kvrange, clean_t=sp.clean_t,
            distill_nearly_clean_chunk_threshold=sp.distill_nearly_clean_chunk_threshold,
        )
        try:
            areas = kv_areas(sched.spec, sp.cfg_number, self.keep_all)
        except ValueError as err:
            raise InvalidInput("num_chunks", str(err)) from err
        tpc = self.dit.tokens_per_chunk(sp.chunk_width, h, w)
        return JobState(ctx, sched, areas, job_blocks(areas, tpc, self.block_tokens))

    def default_blocks(self) -> int:
        """Pool blocks of an endless T2V job at the model's default size and step count
        (:func:`default_job_areas`, :func:`job_blocks`)."""
        mc, sp = self.model_cfg, self.model_cfg.sampling
        f = mc.vae_spatial_factor
        tpc = self.dit.tokens_per_chunk(sp.chunk_width, mc.height // f, mc.width // f)
        return job_blocks(default_job_areas(sp), tpc, self.block_tokens)

    @staticmethod
    def fast_forward(sched: ChunkScheduler, steps_done: int, prefix_done: bool) -> None:
        """Advance ``sched`` past ``steps_done`` denoising forwards (and the prefix extraction
        when ``prefix_done``) without executing them (resume from a snapshot)."""
        todo = steps_done + (1 if prefix_done and sched.chunk_offset > 0 else 0)
        for _ in range(todo):
            plan = sched.next_plan()
            if plan is None:
                break
            sched.update(StepResult(global_step=plan.global_step, emitted=plan.emits))

    # ----- inputs ------------------------------------------------------------------
    def _prefix(self, prefix, h: int, w: int) -> torch.Tensor | None:
        if prefix is None:
            return None
        prefix = torch.as_tensor(prefix, dtype=torch.float32)
        if prefix.ndim == 5 and prefix.shape[0] == 1:
            prefix = prefix[0]
        if prefix.ndim != 4 or prefix.shape[0] != LATENT_CHANNELS or tuple(prefix.shape[2:]) != (h, w) or prefix.shape[1] < 1:
            raise InvalidInput("prefix_latent", f"expected ({LATENT_CHANNELS}, T, {h}, {w}), got {tuple(prefix.shape)}")
        return prefix.to(self.device)

    @staticmethod
    def _noise(noise, chunk_shape: tuple[int, int, int, int], total: int | None) -> torch.Tensor | None:
        """Injected whole-video noise (C, T, h, w) (a leading batch dim of 1 is dropped).

        Raises:
            InvalidInput("noise"): wrong shape, too few frames, or an endless job.
        """
        if noise is None:
            return None
        noise = torch.as_tensor(noise, dtype=torch.float32)
        noise = noise[0] if noise.ndim == 5 else noise
        c, cw, h, w = chunk_shape
        if total is None:
            raise InvalidInput("noise", "injected noise needs a finite num_chunks")
        if noise.ndim != 4 or (noise.shape[0], noise.shape[2], noise.shape[3]) != (c, h, w) or noise.shape[1] < total * cw:
            raise InvalidInput("noise", f"expected ({c}, >= {total * cw}, {h}, {w}), got {tuple(noise.shape)}")
        return noise

    def caption(self, emb, field_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt's (y (L, D), mask (L,)) fitted to the DiT's caption length, on the device.

        Raises:
            InvalidInput(field_name): wrong shape.
        """
        cfg = self.dit.cfg
        y, mask = fit_caption(emb.embedding, emb.mask, cfg.caption_max_length, cfg.caption_channels, field_name)
        return y.to(self.device), mask.to(self.device)

    def captions(self, job: EngineJob, offset: int, num_chunks: int | None) -> CaptionBook:
        """The job's :class:`CaptionBook` (prompt segments, null caption, special tokens).

        Raises:
            InvalidInput("captions"): no segment, a bad embedding, or the first segment not at 0.
        """
        st = self.model_cfg.special_tokens
        negative = self.special_tokens if st.negative_prompt else None
        null_y, null_mask = CaptionBook.null_from(self.dit.y_embedder.null_caption_embedding, negative)
        if not job.captions:
            raise InvalidInput("captions", "at least one caption (prompt segment) is required")
        segments = []
        for start, emb in sorted(job.captions, key=lambda item: item[0]):
            y, mask = self.caption(emb, "captions")
            segments.append((int(start), y, mask))
        if segments[0][0] != 0:
            raise InvalidInput("captions", f"the first prompt segment must start at chunk 0, got {segments[0][0]}")
        book = CaptionBook(segments, null_y.to(self.device), null_mask.to(self.device), chunk_offset=offset)
        flags = self._token_flags()
        if flags is not None:
            book.tokens, book.flags, book.num_chunks = self.special_tokens, flags, num_chunks
        return book

    def _token_flags(self):
        """The model's special-token settings, or None when no conditional caption gets a token."""
        from stages.text_encoder.special_tokens import prepends_to_captions  # noqa: PLC0415

        st = self.model_cfg.special_tokens
        if self.special_tokens is None or not prepends_to_captions(st):
            return None
        return st
