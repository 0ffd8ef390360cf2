"""The DiT engine loop: plan -> execute -> update per job (DESIGN.md section 2).

``Engine`` owns a loaded :class:`~stages.dit.model.MagiDiT` and starts :class:`JobRun`s;
``JobRun.step()`` asks the job's :class:`~cluster.scheduler.chunk_scheduler.ChunkScheduler`
for the next plan, executes it with :class:`~cluster.engine.runner.StepRunner`, reports
the result back and returns the events it produced (a Progress per step and a
LatentChunk the moment a chunk is clean). Plain torch; never imports ray.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from cluster.engine.job import CaptionBook, JobContext, NoiseSource, fit_caption
from cluster.engine.runner import StepOutcome, StepRunner
from cluster.messages import EngineJob, LatentChunk, Progress
from cluster.scheduler.chunk_scheduler import ChunkScheduler
from cluster.scheduler.chunks import prefix_split
from cluster.scheduler.plan import StepResult
from stages.config import ModelConfig
from stages.dit.kv_cache import ChunkKVCache
from stages.dit.model import LATENT_CHANNELS, MagiDiT
from stages.errors import InvalidInput
from stages.sampling import init_intervals, init_t


class JobRun:
    """One job in flight. Create with :meth:`Engine.start`.

    Attributes:
        job_id: the job's id.
        num_chunks: chunks the job yields (None for an endless stream).
        total_forwards: DiT steps of the job (prefix extraction excluded), None if endless.
        last_outcome: the most recent :class:`StepOutcome` (window input / velocity, for tracing).
    """

    def __init__(self, runner: StepRunner, ctx: JobContext, scheduler: ChunkScheduler, num_chunks: int | None):
        self._runner = runner
        self._ctx = ctx
        self._sched = scheduler
        self.job_id = ctx.job_id
        self.num_chunks = num_chunks
        self.last_outcome: StepOutcome | None = None
        self._closed = False

    @property
    def total_forwards(self) -> int | None:
        return self._sched.total_forwards

    @property
    def done(self) -> bool:
        return self._closed or self._sched.done

    @property
    def kv_chunks(self) -> list[int]:
        """Global chunks whose K/V the job currently holds (the bounded ring)."""
        return self._ctx.kv.chunks

    @property
    def kv_nbytes(self) -> int:
        return self._ctx.kv.nbytes

    def step(self) -> list[Progress | LatentChunk]:
        """Run one plan -> execute -> update; returns the events (empty when done).

        Events: one ``Progress`` per denoising step (``chunk`` = the oldest chunk in flight,
        relative to the first generated chunk; ``step`` = denoising steps it has completed,
        1..num_steps; the V2V prefix-extraction step reports none), then a ``LatentChunk``
        for every chunk that became clean in this step (``latent`` float32 (C, T, h, w) on
        CPU; T = chunk_width except the first chunk after a V2V prefix with leftover frames,
        whose prefix frames are cut as the reference does). Resources are released after
        the last step.

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
        outcome = self._runner.execute(plan, self._ctx)
        self._sched.update(StepResult(global_step=plan.global_step, emitted=tuple(outcome.emitted)))
        self.last_outcome = outcome
        events: list[Progress | LatentChunk] = []
        den = plan.denoise_slots
        if den:
            oldest = den[0]
            events.append(Progress(self.job_id, oldest.chunk - self._ctx.chunk_offset, oldest.step_index + 1, self._ctx.num_steps))
        elapsed = time.perf_counter() - started
        for chunk, latent in outcome.emitted.items():
            events.append(LatentChunk(self.job_id, chunk - self._ctx.chunk_offset, latent, {"dit_step_s": elapsed}))
        if self._sched.done:
            self.close()
        return events

    def cancel(self) -> None:
        """Stop the job now and release its memory."""
        self._sched.cancel()
        self.close()

    def close(self) -> None:
        """Release the job's KV storage and latents (idempotent)."""
        self._closed = True
        self._ctx.kv.clear()
        self._ctx.latents.clear()


class Engine:
    """Runs jobs on one DiT (single device; context parallelism comes later).

    Args:
        model_cfg: the served model's configuration (sampling settings, geometry, special tokens).
        dit: the loaded DiT.
        device: where latents and K/V live (the DiT must be there already).
        special_tokens: the model's special-token table
            (``stages.text_encoder.special_tokens.SpecialTokenTable``, see
            :func:`stages.dit.token_table.load_special_tokens`); required when
            ``model_cfg.special_tokens`` prepends anything, ignored otherwise.

    Raises:
        ValueError: special tokens are enabled but no table is given, or its width differs
            from the DiT's ``caption_channels``.
    """

    def __init__(self, model_cfg: ModelConfig, dit: MagiDiT, device: str = "cpu", special_tokens: Any = None):
        self.model_cfg = model_cfg
        self.dit = dit.to(device).eval()
        self.device = torch.device(device)
        self.runner = StepRunner(self.dit, model_cfg.sampling)
        st = model_cfg.special_tokens
        self.special_tokens = special_tokens if st.enabled else None
        if st.enabled and special_tokens is None:
            raise ValueError(
                f"model {model_cfg.name!r} enables special tokens (special_tokens): pass the table, e.g. "
                "Engine.from_checkpoint(...) or special_tokens=stages.dit.token_table.load_special_tokens(cfg, dit_dir)"
            )
        if self.special_tokens is not None and self.special_tokens.dim != dit.cfg.caption_channels:
            raise ValueError(f"special-token width {self.special_tokens.dim} != caption_channels {dit.cfg.caption_channels}")

    @classmethod
    def from_checkpoint(cls, model_cfg: ModelConfig, dit_dir: Path, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Engine":
        """Load the DiT (:func:`stages.dit.weights.load_dit`, distill variant from the sampling
        settings) and its special-token table (:func:`stages.dit.token_table.load_special_tokens`)
        from the checkpoint folder ``dit_dir`` and build the engine.

        Raises:
            FileNotFoundError, stages.dit.weights.CheckpointMismatch: see the loaders.
        """
        from stages.dit.token_table import load_special_tokens  # noqa: PLC0415
        from stages.dit.weights import load_dit  # noqa: PLC0415

        dit = load_dit(Path(dit_dir), model_cfg.dit, device=device, dtype=dtype, distill=model_cfg.sampling.distill)
        return cls(model_cfg, dit, device=device, special_tokens=load_special_tokens(model_cfg, Path(dit_dir)))

    def start(self, job: EngineJob, noise: torch.Tensor | None = None) -> JobRun:
        """Prepare a job: geometry, captions per chunk, noise, scheduler.

        Args:
            job: the job (spec, caption embeddings per prompt segment, prefix latent).
            noise: optional (C, T_total, h, w) or (1, C, T_total, h, w) initial noise of all
                chunks (prefix chunks included), for parity with the reference's
                ``torch.randn(latent_size)``; by default chunk c's noise comes from a
                generator seeded by (seed, c).

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
        p_frames = 0 if prefix is None else prefix.shape[1]
        offset, _ = prefix_split(p_frames, sp.chunk_width)
        if spec.num_chunks is not None and spec.num_chunks <= 0:
            raise InvalidInput("num_chunks", f"must be positive, got {spec.num_chunks}")
        total = None if spec.num_chunks is None else offset + spec.num_chunks
        ctx = JobContext(
            job_id=spec.job_id, chunk_width=sp.chunk_width, latent_h=h, latent_w=w,
            noise=NoiseSource(spec.seed, (LATENT_CHANNELS, sp.chunk_width, h, w), self._noise(noise)),
            captions=self._captions(job, offset, spec.num_chunks), prefix=prefix, chunk_offset=offset, num_steps=spec.num_steps,
            kv=ChunkKVCache(self.dit.cfg.num_layers),
        )
        sched = ChunkScheduler(
            num_chunks=total, window_size=sp.window_size, num_steps=spec.num_steps,
            t_schedule=init_t(spec.num_steps, sp.shortcut_mode).tolist(),
            distill_intervals=init_intervals(spec.num_steps, sp.shortcut_mode), chunk_offset=offset,
            noise2clean_kvrange=sp.noise2clean_kvrange, clean_chunk_kvrange=sp.clean_chunk_kvrange, clean_t=sp.clean_t,
            distill_nearly_clean_chunk_threshold=sp.distill_nearly_clean_chunk_threshold,
        )
        return JobRun(self.runner, ctx, sched, spec.num_chunks)

    def _prefix(self, prefix, h: int, w: int) -> torch.Tensor | None:
        if prefix is None:
            return None
        prefix = torch.as_tensor(prefix, dtype=torch.float32)
        if prefix.ndim == 5 and prefix.shape[0] == 1:
            prefix = prefix[0]
        if prefix.ndim != 4 or prefix.shape[0] != LATENT_CHANNELS or tuple(prefix.shape[2:]) != (h, w) or prefix.shape[1] < 1:
            raise InvalidInput("prefix_latent", f"expected ({LATENT_CHANNELS}, T, {h}, {w}), got {tuple(prefix.shape)}")
        return prefix.to(self.device)

    def _noise(self, noise) -> torch.Tensor | None:
        if noise is None:
            return None
        noise = torch.as_tensor(noise, dtype=torch.float32)
        return noise[0] if noise.ndim == 5 else noise

    def _captions(self, job: EngineJob, offset: int, num_chunks: int | None) -> CaptionBook:
        cfg, st = self.dit.cfg, self.model_cfg.special_tokens
        negative = self.special_tokens if st.negative_prompt else None
        null_y, null_mask = CaptionBook.null_from(self.dit.y_embedder.null_caption_embedding, negative)
        if not job.captions:
            raise InvalidInput("captions", "at least one caption (prompt segment) is required")
        segments = []
        for start, emb in sorted(job.captions, key=lambda item: item[0]):
            y, mask = fit_caption(emb.embedding, emb.mask, cfg.caption_max_length, cfg.caption_channels, "captions")
            segments.append((int(start), y.to(self.device), mask.to(self.device)))
        if segments[0][0] != 0:
            raise InvalidInput("captions", f"the first prompt segment must start at chunk 0, got {segments[0][0]}")
        book = CaptionBook(segments, null_y.to(self.device), null_mask.to(self.device), chunk_offset=offset)
        flags = self._token_flags()
        if flags is not None:
            book.tokens, book.flags, book.num_chunks = self.special_tokens, flags, num_chunks
        return book

    def _token_flags(self):
        """``SpecialTokenFlags`` of the conditional captions, or None when none is prepended."""
        st = self.model_cfg.special_tokens
        names = ("static", "dynamic", "borderness", "hq", "three_d_model", "two_d_anime", "duration")
        if self.special_tokens is None or not any(getattr(st, n) for n in names):
            return None
        from stages.text_encoder.special_tokens import SpecialTokenFlags  # noqa: PLC0415

        return SpecialTokenFlags(**{n: getattr(st, n) for n in names})
