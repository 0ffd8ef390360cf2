"""Embedding modules of the MAGI-1 DiT: timestep, caption, 3-D learnable RoPE, final linear.

Module and parameter names equal the reference (``inference/model/dit/dit_module.py``)
so that ``state_dict`` keys match the official checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.config import DiTConfig


class FusedLayerNorm(nn.Module):
    """LayerNorm over the last dim (reference ``FusedLayerNorm``).

    Quirk reproduced: with ``apply_layernorm_1p`` the stored weight is zero-centred and the
    effective gain is ``weight + 1``.
    """

    def __init__(self, cfg: DiTConfig, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.zero_centered_gamma = cfg.apply_layernorm_1p
        self.eps = cfg.layernorm_epsilon
        self.hidden_size = (hidden_size,)
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return F.layer_norm(x, self.hidden_size, weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class TimestepEmbedder(nn.Module):
    """Sinusoid of ``t * 1000`` followed by a 2-layer SiLU MLP (reference ``TimestepEmbedder``).

    Sinusoid: ``args = t * exp(-ln(10000) * i / 128) * 1000`` for i < 128 and
    ``[cos(args), sin(args)]`` (cos first), 256 dims (reference ``timestep_embedding``).
    """

    frequency_embedding_size = 256
    timestep_rescale_factor = 1000

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        width = int(cfg.hidden_size * cfg.cond_hidden_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(self.frequency_embedding_size, width, bias=True),
            nn.SiLU(),
            nn.Linear(width, width, bias=True),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, rescale: float = 1000.0) -> torch.Tensor:
        """(K,) float timesteps -> (K, dim) float32 ``[cos | sin]`` features."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None] * rescale
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(K,) timesteps in [0, 1] -> (K, hidden_size * cond_hidden_ratio)."""
        freq = self.sinusoid(t.to(torch.float32), self.frequency_embedding_size, rescale=self.timestep_rescale_factor)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Caption projections (reference ``CaptionEmbedder``).

    ``y_proj_xattn`` (Linear + SiLU) feeds cross-attention; ``y_proj_adaln`` feeds the adaLN
    condition. Quirk reproduced (reference ``caption_drop_single_token``): at inference the
    adaLN input is never the caption itself but ``null_caption_embedding[-2]`` (caption kept)
    or ``null_caption_embedding[-1]`` (caption dropped, ``caption_dropout=True``).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.y_proj_xattn = nn.Sequential(
            nn.Linear(cfg.caption_channels, int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio), bias=True), nn.SiLU()
        )
        self.y_proj_adaln = nn.Sequential(
            nn.Linear(cfg.caption_channels, int(cfg.hidden_size * cfg.cond_hidden_ratio), bias=True)
        )
        self.null_caption_embedding = nn.Parameter(torch.empty(cfg.caption_max_length, cfg.caption_channels))

    def xattn(self, y: torch.Tensor) -> torch.Tensor:
        """(..., L, caption_channels) -> (..., L, hidden_size * xattn_cond_hidden_ratio)."""
        return self.y_proj_xattn(y)

    def adaln(self, caption_dropout: torch.Tensor) -> torch.Tensor:
        """(K,) bool -> (K, hidden_size * cond_hidden_ratio) adaLN caption term."""
        null = self.null_caption_embedding
        rows = torch.where(caption_dropout[:, None], null[None, -1, :], null[None, -2, :])
        return self.y_proj_adaln(rows)


class LearnableRotaryEmbeddingCat(nn.Module):
    """3-D RoPE with learnable frequency bands (reference ``LearnableRotaryEmbeddingCat``, in_pixels=False).

    ``bands`` has ``dim // 8`` entries, initialised to ``1 / 10000 ** (i / (dim // 8))``.
    Table layout per token: ``[sin(t-bands, h-bands, w-bands) | cos(same)]``, i.e.
    (S, 6 * dim // 8); rotary therefore covers the first 3/4 of the head dim.
    Positions (reference ``build_fourier_pos_embed``): t = absolute latent frame index over
    the whole sequence including history; h, w centred (``i - (n - 1) / 2``); every axis of
    size f > 1 is rescaled ``x / (f - 1) * (r - 1)`` with ref shape
    ``(T_total, H / s, W / s)``, ``s = sqrt(H * W / 256)`` (H, W in patches). The time axis
    is "rescaled" by ``x / (T_total - 1) * (T_total - 1)``, which is not the identity in
    float32: reproduced by computing with the full ``T_total`` of the sequence.
    """

    def __init__(self, dim: int, temperature: float = 10000.0):
        super().__init__()
        self.dim = dim
        num_bands = dim // 8
        exp = torch.arange(0, num_bands, 1, dtype=torch.int64).to(torch.float32) / num_bands
        self.bands = nn.Parameter(1.0 / (temperature**exp))

    def table(self, frame_offset: int, frames: int, h: int, w: int) -> torch.Tensor:
        """RoPE rows for latent frames ``[frame_offset, frame_offset + frames)`` of a sequence
        of ``T_total = frame_offset + frames`` frames, tokens ordered (T H W).

        Returns:
            (frames * h * w, 6 * (dim // 8)) float32 ``[sin | cos]``; equals the reference
            ``rope.get_embed(...)[-(frames*h*w):]`` row for row.
        """
        bands = self.bands.float()
        dev = bands.device
        total = frame_offset + frames
        rescale = math.sqrt((h * w) / (16 * 16))
        ref = (total, h / rescale, w / rescale)
        sizes = (total, h, w)
        axes = [torch.arange(s, device=dev, dtype=torch.int64).to(torch.float32) for s in sizes]
        axes[0] = axes[0][frame_offset:]
        axes[1] = axes[1] - (h - 1) / 2
        axes[2] = axes[2] - (w - 1) / 2
        axes = [a if f == 1 else a / (f - 1) * (r - 1) for a, f, r in zip(axes, sizes, ref)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(-1)
        pos = grid * bands  # (T, H, W, 3, nb)
        n = frames * h * w
        return torch.cat([pos.sin().reshape(n, -1), pos.cos().reshape(n, -1)], dim=-1)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX-halves rotary (flash-attn ``apply_rotary_emb``, interleaved=False).

    Args:
        x: (S, H, Dh); sin, cos: (S, R) with 2R <= Dh. Channels beyond 2R pass through.
    Returns:
        (S, H, Dh): ``[x1 cos - x2 sin, x2 cos + x1 sin, x[2R:]]`` with x1, x2 = x[:R], x[R:2R].
    """
    r = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :r], x[..., r : 2 * r]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * r :]], dim=-1)


def rope_time_shift(k: torch.Tensor, bands: torch.Tensor | Sequence[float], frames: int, t_patch_size: int) -> torch.Tensor:
    """Move post-RoPE keys ``frames`` latent frames earlier in time.

    Rotates the time bands of (S, G, Dh) keys by ``-frames / t_patch_size * band`` (RoPE
    composes, R(p - d) = R(-d) R(p); the h/w bands and the non-rotary channels are untouched;
    band layout of :class:`LearnableRotaryEmbeddingCat`). Used to re-base cached keys (engine
    RoPE position policy).

    Args:
        k: (S, G, Dh) keys after RoPE; bands: the ``rope.bands`` values (Dh // 8) as float32.
        frames: latent frames to move back; t_patch_size: latent frames per patch in time.
    Returns:
        float32-computed keys in ``k``'s dtype.
    """
    bands = torch.as_tensor(bands, dtype=torch.float32).to(k.device)
    ang = torch.zeros(3, bands.shape[0], device=k.device)
    ang[0] = -float(frames) / max(1, t_patch_size) * bands
    row = ang.reshape(1, -1)
    return apply_rotary(k.float(), row.sin(), row.cos()).to(k.dtype)


@dataclass(frozen=True)
class RopeShift:
    """Picklable :func:`rope_time_shift` with fixed arguments: ``RopeShift(...)(k)`` (sent to the
    ranks of a parallel mesh to re-base their KV pool shards)."""

    bands: tuple[float, ...]
    frames: int
    t_patch_size: int

    def __call__(self, k: torch.Tensor) -> torch.Tensor:
        return rope_time_shift(k, self.bands, self.frames, self.t_patch_size)


class FinalLinear(nn.Module):
    """Final projection to patch pixels (reference ``FinalLinear``), no bias."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        out = cfg.patch_size * cfg.patch_size * cfg.t_patch_size * cfg.out_channels
        self.linear = nn.Linear(cfg.hidden_size, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
