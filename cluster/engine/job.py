"""Per-job state of the DiT engine: geometry, noise, captions per chunk, latents in flight, KV cache.

Plain torch, no Ray. Chunk indices are global (V2V prefix chunks included); user-facing
indices (``LatentChunk.index``, ``PromptSegment.start_chunk``) are relative to the first
generated chunk, i.e. ``global - chunk_offset``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from stages.errors import InvalidInput

NULL_CAPTION_TOKENS = 50  # reference ``_process_null_embeddings``: null mask = first 50 tokens (hard-coded)


def chunk_seed(seed: int, chunk: int) -> int:
    """63-bit generator seed of global chunk ``chunk``'s noise: sha256 of ``"seed:chunk"``.

    Our departure from the reference (which draws the whole video's noise at once after
    ``torch.manual_seed(seed)``): each chunk's noise is independent of the video length,
    so unbounded streams and resumed jobs are deterministic.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(chunk)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class NoiseSource:
    """Initial noise of each chunk, float32 (C, chunk_width, h, w).

    Attributes:
        seed: job seed (used when ``injected`` is None).
        shape: (C, chunk_width, h, w).
        injected: optional (C, T_total, h, w) noise of the whole video (parity tests with
            the reference's ``torch.randn(latent_size)``); chunk c gets frames
            ``[c * chunk_width, (c + 1) * chunk_width)``.
    """

    seed: int
    shape: tuple[int, int, int, int]
    injected: torch.Tensor | None = None

    def chunk(self, c: int, device) -> torch.Tensor:
        """Noise of global chunk ``c``.

        Raises:
            InvalidInput: injected noise too short or of the wrong size (field ``noise``).
        """
        ch, cw, h, w = self.shape
        if self.injected is None:
            gen = torch.Generator().manual_seed(chunk_seed(self.seed, c))
            return torch.randn(self.shape, generator=gen, dtype=torch.float32).to(device)
        part = self.injected[:, c * cw : (c + 1) * cw]
        if tuple(part.shape) != self.shape:
            raise InvalidInput("noise", f"injected noise {tuple(self.injected.shape)} has no chunk {c} of shape {self.shape}")
        return part.to(device=device, dtype=torch.float32).clone()


NEGATIVE_PROMPT_KEYS = ("CAPTION_TOKEN", "LOGO_TOKEN", "TRANS_TOKEN", "BORDERNESS_TOKEN")  # reference get_negative_special_token_keys


@dataclass
class CaptionBook:
    """Caption of every chunk (reference ``_process_txt_embeddings`` / ``_process_null_embeddings``).

    Attributes:
        segments: ((start_chunk relative to the first generated chunk, y (L, D), mask (L,)), ...)
            sorted by start; a segment applies from its start on.
        null_y: (L, D) null caption (``null_caption_embedding``, with the negative-prompt tokens
            prepended when enabled); null_mask: (L,) first 50 tokens valid.
        chunk_offset: global index of the first generated chunk.
        tokens: optional special-token table (``stages.text_encoder.special_tokens.SpecialTokenTable``);
            flags: its ``SpecialTokensConfig``; num_chunks: generated chunks of the job (None = endless),
            for the duration token.
    """

    segments: list[tuple[int, torch.Tensor, torch.Tensor]]
    null_y: torch.Tensor
    null_mask: torch.Tensor
    chunk_offset: int = 0
    tokens: Any = None
    flags: Any = None
    num_chunks: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def null_from(null_caption_embedding: torch.Tensor, tokens: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(null_y (L, D) float32, null_mask (L,) int64 with the first 50 tokens = 1).

        With ``tokens`` (a special-token table) the reference ``NEG_PROMPT`` tokens CAPTION, LOGO,
        TRANS, BORDERNESS are prepended (so BORDERNESS comes first) and the result cut to L; the
        mask stays the first 50 tokens (reference ``_process_null_embeddings``).
        """
        null_y = null_caption_embedding.detach().float()
        if tokens is not None:
            null_y, _ = tokens.prepend(null_y, torch.ones(null_y.shape[0], dtype=torch.int64), list(NEGATIVE_PROMPT_KEYS))
        mask = torch.zeros(null_y.shape[0], dtype=torch.int64, device=null_y.device)
        mask[:NULL_CAPTION_TOKENS] = 1
        return null_y, mask

    def caption(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (L, D), mask (L,)) of global chunk ``chunk``: its segment's caption with the special
        tokens of its position prepended (reference ``pad_special_token``; the duration token counts
        the generated chunks left, ``min(n - c - 1, 7) + 1``); the null caption for prefix chunks
        and for a segment whose mask is all zero (reference ``emb_masks.sum() == 0`` branch of
        ``extract_feature_for_inference``)."""
        rel = chunk - self.chunk_offset
        current = None
        for i, (start, y, mask) in enumerate(self.segments):
            if start <= rel:
                current = (i, y, mask)
        if current is None or rel < 0 or not bool(current[2].any()):
            return self.null_y, self.null_mask
        i, y, mask = current
        if self.tokens is None:
            return y, mask
        from stages.text_encoder.special_tokens import special_token_keys  # noqa: PLC0415

        keys = tuple(special_token_keys(self.flags, rel, self.num_chunks))
        if (i, keys) not in self._cache:
            self._cache[(i, keys)] = self.tokens.prepend(y, mask, list(keys))
        return self._cache[(i, keys)]

    def update(self, start: int, y: torch.Tensor, mask: torch.Tensor) -> None:
        """Prompt ``(y, mask)`` applies from generated chunk ``start`` on: segments starting at or
        after ``start`` are replaced (the latest update wins for every chunk it covers)."""
        self.segments = [seg for seg in self.segments if seg[0] < start] + [(int(start), y, mask)]
        self._cache.clear()


def fit_caption(y: torch.Tensor, mask: torch.Tensor, length: int, channels: int, field_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad with zeros / truncate a caption to ``length`` tokens (mask 0 on padding).

    Raises:
        InvalidInput(field_name): wrong rank, channel count or mask length.
    """
    y = torch.as_tensor(y, dtype=torch.float32)
    mask = torch.as_tensor(mask).to(torch.int64)
    if y.ndim != 2 or y.shape[1] != channels:
        raise InvalidInput(field_name, f"caption embedding must be (L, {channels}), got {tuple(y.shape)}")
    if mask.shape != y.shape[:1]:
        raise InvalidInput(field_name, f"caption mask {tuple(mask.shape)} does not match embedding {tuple(y.shape)}")
    if y.shape[0] >= length:
        return y[:length].contiguous(), mask[:length].contiguous()
    pad = length - y.shape[0]
    return torch.cat([y, y.new_zeros(pad, channels)]), torch.cat([mask, mask.new_zeros(pad)])


@dataclass
class JobContext:
    """Everything the runner needs about one job between steps.

    Attributes:
        job_id: the job.
        chunk_width: latent frames per chunk; latent_h, latent_w: latent size.
        noise: :class:`NoiseSource`; captions: :class:`CaptionBook`.
        prefix: (C, P, h, w) scaled prefix latent (I2V image / V2V video) or None.
        chunk_offset: whole prefix chunks (P // chunk_width).
        num_steps: denoising steps per chunk.
        kv: the job's K/V in the engine's pool (:class:`cluster.engine.kv_layout.JobKV`; its
            ``ring`` says where they are and holds the RoPE base), None until the job is admitted.
        latents: global chunk -> (C, chunk_width, h, w) latent of chunks in flight.
        max_started: highest global chunk that has entered a window (its caption is in use).
    """

    job_id: str
    chunk_width: int
    latent_h: int
    latent_w: int
    noise: NoiseSource
    captions: CaptionBook
    prefix: torch.Tensor | None
    chunk_offset: int
    num_steps: int
    kv: Any = None
    latents: dict[int, torch.Tensor] = field(default_factory=dict)
    max_started: int = -1

    @property
    def prefix_frames(self) -> int:
        return 0 if self.prefix is None else int(self.prefix.shape[1])

    def emitted_frames(self, chunk: int) -> torch.Tensor:
        """The clean latent frames of ``chunk`` the job yields (reference ``integrate_velocity``):
        frames before the end of a V2V prefix are cut, except I2V's 1-frame prefix in chunk 0."""
        cw, p = self.chunk_width, self.prefix_frames
        start = max(chunk * cw, p)
        if chunk == 0 and p == 1:
            start = 0
        return self.latents[chunk][:, start - chunk * cw :].float().cpu().clone()
