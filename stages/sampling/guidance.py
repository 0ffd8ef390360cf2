"""Classifier-free guidance of the MAGI-1 chunk pipeline (DESIGN.md section 3, "Guidance").

Base models (cfg_number 3) run three branches per step: ``uncond`` (each chunk
alone, null caption, no history), ``cond_prev`` (null caption + KV history)
and ``cond_prev_text`` (caption + KV history), combined per chunk with scales
looked up from the chunk's timestep. Distilled models (cfg_number 1) run one
forward and blend the nearly clean chunk's output with a self-only copy.
All functions are pure and keep the reference's float32 operation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stages.errors import InvalidInput
from stages.sampling._chunks import Scalars, as_f32, chunk_view, per_chunk, same_shape

CFG_T_EPS = 1e-7  # reference ``get_cfg_scale``: searchsorted(cfg_t_range - 1e-7, t) - 1


def cfg_scales(
    t: Scalars,
    cfg_t_range: Sequence[float],
    prev_chunk_scales: Sequence[float],
    text_scales: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk (prev_chunk_scale, text_scale) for timesteps ``t`` (reference ``get_cfg_scale``).

    idx = searchsorted(cfg_t_range - 1e-7, t) - 1 in float32, i.e. the last
    range start r_i with r_i - 1e-7 < t; a boundary value itself (t = 0.0217,
    0.1 or 0.3 in float32) already belongs to the range it starts. With the
    shipped settings text guidance is off (text_scale 0) for t >= 0.3.

    Args:
        t: (K,) float32 timesteps of the denoising chunks (or one float).
        cfg_t_range: nondecreasing range starts, e.g. (0, 0.0217, 0.1, 0.3, 0.999).
        prev_chunk_scales: one scale per range (prev_chunk_scale, w_prev).
        text_scales: one scale per range (text_scale, w_text).

    Returns:
        (prev_chunk_scale, text_scale): float32 tensors of ``t``'s shape.

    Raises:
        InvalidInput: the three sequences differ in length or are empty
            (field ``cfg_t_range``), or a t lies below ``cfg_t_range[0]`` (field ``t``).
    """
    if not (len(cfg_t_range) == len(prev_chunk_scales) == len(text_scales)) or not cfg_t_range:
        raise InvalidInput(
            "cfg_t_range",
            f"cfg_t_range ({len(cfg_t_range)}), prev_chunk_scales ({len(prev_chunk_scales)}) and "
            f"text_scales ({len(text_scales)}) must be non-empty and of equal length",
        )
    tt = as_f32(t, "t")
    bounds = torch.tensor(list(cfg_t_range), dtype=torch.float32) - CFG_T_EPS
    idx = torch.searchsorted(bounds, tt) - 1
    if bool((idx < 0).any()):
        raise InvalidInput("t", f"timesteps {tt.tolist()} lie below cfg_t_range[0]={cfg_t_range[0]}")
    prev = torch.tensor(list(prev_chunk_scales), dtype=torch.float32)
    text = torch.tensor(list(text_scales), dtype=torch.float32)
    return prev[idx], text[idx]


def combine_cfg3(
    uncond: torch.Tensor,
    cond_prev: torch.Tensor,
    cond_prev_text: torch.Tensor,
    prev_scale: Scalars,
    text_scale: Scalars,
    *,
    chunk_width: int | None = None,
) -> torch.Tensor:
    """Three-branch CFG: (1 - p) u + (p - s) c_p + s c_pt per chunk (reference ``forward_dispatcher``).

    p = prev_chunk_scale and s = text_scale of each chunk (see :func:`cfg_scales`).
    Identities: s = 0 ignores ``cond_prev_text``; p = 1, s = 0 returns ``cond_prev``.

    Args:
        uncond, cond_prev, cond_prev_text: velocities of the K denoising chunks,
            (..., T, H, W) with T = K * chunk_width along dim -3 (e.g. (B, C, T, H, W)),
            same shape and dtype (float32 in the reference).
        prev_scale, text_scale: one float for all chunks, or (K,) per chunk.
        chunk_width: latent frames per chunk; checked against T / K when given.

    Returns:
        tensor of ``uncond``'s shape.

    Raises:
        InvalidInput: shapes differ, the scales differ in length, or T is not K chunks.
    """
    same_shape("cond_prev", uncond, cond_prev)
    same_shape("cond_prev_text", uncond, cond_prev_text)
    p = as_f32(prev_scale, "prev_scale")
    s = as_f32(text_scale, "text_scale")
    if p.shape != s.shape:
        raise InvalidInput("text_scale", f"shape {tuple(s.shape)} differs from prev_scale's {tuple(p.shape)}")
    if p.dim() == 0:
        k = 1 if chunk_width is None else uncond.shape[-3] // max(chunk_width, 1)
        p, s = p.expand(k), s.expand(k)
    k = p.shape[0]
    u = chunk_view(uncond, k, "uncond", chunk_width)
    cp = chunk_view(cond_prev, k, "cond_prev", chunk_width)
    cpt = chunk_view(cond_prev_text, k, "cond_prev_text", chunk_width)
    pb, sb = per_chunk(p, u), per_chunk(s, u)
    out = (1 - pb) * u + (pb - sb) * cp + sb * cpt
    return out.reshape(uncond.shape)


def distill_blend(with_history: torch.Tensor, self_only: torch.Tensor, prev_chunks_scale: float = 0.7) -> torch.Tensor:
    """Blend of the nearly clean chunk's two outputs for distilled models (reference ``forward_dispatcher``, cfg_number 1).

    out = prev_chunks_scale * with_history + (1 - prev_chunks_scale) * self_only,
    where ``with_history`` is the chunk's output in the normal forward (KV
    history visible) and ``self_only`` the output of its copy that attends only
    to itself. Used when the first denoising chunk's t exceeds
    ``distill_nearly_clean_chunk_threshold`` (reference env ``prev_chunks_scale``, default 0.7).

    Args:
        with_history, self_only: (..., chunk_width, H, W) velocities of one chunk, same shape.
        prev_chunks_scale: weight of ``with_history``.

    Returns:
        tensor of ``with_history``'s shape.

    Raises:
        InvalidInput: shapes differ.
    """
    same_shape("self_only", with_history, self_only)
    return with_history * prev_chunks_scale + self_only * (1 - prev_chunks_scale)
