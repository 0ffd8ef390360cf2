"""Classifier-free guidance of the MAGI-1 chunk pipeline (DESIGN.md section 3, "Guidance"):
which branches a job's step runs, and how their outputs combine.

Branch names follow the MAGI-1 paper's guidance terms (section "Inference"; reference
``forward_3cfg``), one meaning each (:class:`Branch`):

* ``uncond``: each denoising chunk alone: null caption, no history (previous chunks' K/V).
* ``cond_prev``: conditioned on the previous chunks only: null caption + history.
* ``cond_prev_text``: conditioned on the previous chunks and the text: caption + history.

Base models (cfg_number 3) run ``cond_prev`` always (its K/V are the job's history) and the
other two when their weight is nonzero for some chunk; the outputs combine per chunk with
scales looked up from the chunk's timestep (:func:`cfg_scales`, :func:`combine_cfg3`).
Distilled models (cfg_number 1) run ``cond_prev_text`` alone (its K/V are the history) and,
for a nearly clean first chunk, blend it with a self-only copy (:func:`distill_blend`).
:func:`select_branches` decides, :func:`guided_velocity` combines; the engine only packs the
chosen branches into its forward. All functions are pure and keep the reference's float32
operation order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from stages.errors import InvalidInput
from stages.sampling._chunks import Scalars, as_f32, chunk_view, per_chunk, same_shape

CFG_T_EPS = 1e-7  # reference ``get_cfg_scale``: searchsorted(cfg_t_range - 1e-7, t) - 1


class Branch(str, Enum):
    """A guidance branch (module docstring). Member order = order in the packed forward."""

    COND_PREV = "cond_prev"
    COND_PREV_TEXT = "cond_prev_text"
    UNCOND = "uncond"

    @property
    def uses_caption(self) -> bool:
        """Denoising chunks get the caption (adaLN caption row -2); else the null caption (row -1)."""
        return self is Branch.COND_PREV_TEXT

    @property
    def sees_history(self) -> bool:
        """Queries attend to the previous chunks' K/V (``kv_range``); ``uncond``: each chunk alone."""
        return self is not Branch.UNCOND


def history_branch(cfg_number: int) -> Branch:
    """The branch whose clean re-forward K/V become the job's history: ``cond_prev`` for base
    models (cfg_number 3), ``cond_prev_text`` for distilled ones (cfg_number 1)."""
    return Branch.COND_PREV if cfg_number == 3 else Branch.COND_PREV_TEXT


@dataclass(frozen=True)
class Guidance:
    """The branches of one job's step and their weights (:func:`select_branches`).

    Attributes:
        cfg_number: 3 (three-branch CFG) or 1 (distilled, one branch).
        branches: branches to run, in :class:`Branch` order.
        prev_scale, text_scale: (n,) float32 per denoising chunk (cfg 3 with n > 0), else None.
        self_only: cfg 1: the first denoising chunk also runs as a self-only copy appended to
            the window (reference ``distill_nearly_clean_chunk``) and is blended.
    """

    cfg_number: int
    branches: tuple[Branch, ...]
    prev_scale: torch.Tensor | None = None
    text_scale: torch.Tensor | None = None
    self_only: bool = False


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


def select_branches(sampling, t_denoise: torch.Tensor, nearly_clean: bool = False) -> Guidance:
    """Which branches a step runs (reference ``forward_dispatcher``; module docstring).

    A cfg-3 branch whose weight is 0 for every denoising chunk is left out: it contributes
    ``0 * v`` to :func:`combine_cfg3` (``cond_prev_text`` when text_scale is 0, ``uncond``
    when prev_chunk_scale is 1).

    Args:
        sampling: :class:`stages.config.SamplingConfig` (cfg_number, cfg_t_range,
            prev_chunk_scales, text_scales).
        t_denoise: (n,) float32 timesteps of the step's denoising chunks (n may be 0).
        nearly_clean: the plan's ``distill_nearly_clean_chunk`` flag (cfg 1 only).

    Raises:
        InvalidInput: see :func:`cfg_scales`.
    """
    n = int(t_denoise.numel())
    if sampling.cfg_number != 3:
        return Guidance(1, (Branch.COND_PREV_TEXT,), self_only=nearly_clean and n > 0)
    if n == 0:
        return Guidance(3, (Branch.COND_PREV,))
    p, s = cfg_scales(t_denoise.cpu(), sampling.cfg_t_range, sampling.prev_chunk_scales, sampling.text_scales)
    use = {Branch.COND_PREV: True, Branch.COND_PREV_TEXT: bool((s != 0).any()), Branch.UNCOND: bool((p != 1).any())}
    return Guidance(3, tuple(b for b in Branch if use[b]), p, s)


def guided_velocity(g: Guidance, velocity: Mapping[Branch, torch.Tensor], n: int, chunk_width: int,
                    prev_chunks_scale: float) -> torch.Tensor:
    """The window's velocity from its branch outputs (reference ``forward_dispatcher``).

    Args:
        g: the step's :class:`Guidance`.
        velocity: per branch of ``g`` its output: the history branch and ``cond_prev_text``
            (C, K * chunk_width, H, W) over the window (cfg 1 with ``self_only``: one chunk
            more, the copy last); ``uncond`` (C, n * chunk_width, H, W) over the denoising chunks.
        n: denoising chunks, the last n of the window; chunk_width: latent frames per chunk.
        prev_chunks_scale: weight of the history output in :func:`distill_blend`.

    Returns:
        (C, K * chunk_width, H, W): cfg 3: the denoising chunks combined by :func:`combine_cfg3`
        (absent branches count as zero), the other chunks as ``cond_prev``; cfg 1: the one
        output, the first denoising chunk blended with its self-only copy.
    """
    cw = chunk_width
    hist = velocity[history_branch(g.cfg_number)]
    if g.cfg_number == 3:
        if n == 0:
            return hist
        cond = hist[:, -n * cw :]
        text = velocity[Branch.COND_PREV_TEXT][:, -n * cw :] if Branch.COND_PREV_TEXT in velocity else torch.zeros_like(cond)
        uncond = velocity.get(Branch.UNCOND, torch.zeros_like(cond))
        mixed = combine_cfg3(uncond, cond, text, g.prev_scale, g.text_scale, chunk_width=cw)
        return torch.cat([hist[:, : -n * cw], mixed], dim=1)
    if not g.self_only:
        return hist
    k = hist.shape[1] // cw - 1
    seg = slice((k - n) * cw, (k - n + 1) * cw)
    v = hist[:, : k * cw].clone()
    v[:, seg] = distill_blend(v[:, seg], hist[:, k * cw :], prev_chunks_scale)
    return v
