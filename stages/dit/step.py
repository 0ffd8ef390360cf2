"""Per-forward inputs of a packed DiT forward, and the placeholder of a layer another pipeline stage holds.

:func:`pack_step` computes what every layer of :meth:`stages.dit.model.MagiDiT.forward_packed`
shares (patch embeddings, RoPE rows, adaLN conditions, caption tokens, the packed layout). The
single-process forward uses it whole; a rank of a parallel mesh
(:mod:`stages.parallel.pipeline`) slices it into micro-batches and cp token slices.
:func:`unpatchify` turns the packed output back into latent frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from stages.dit.packed import PackedLayout, PackedWindow, packed_layout

LATENT_CHANNELS = 16


@dataclass
class PackedStep:
    """What every layer of a packed forward shares (built by :func:`pack_step`).

    Attributes:
        hidden: (S, D) params-dtype patch embeddings of the packed tokens (None when not embedded).
        rope_sin, rope_cos: (S, R) float32 RoPE rows.
        layout: attention specs, K/V destinations and token maps (:func:`stages.dit.packed.packed_layout`).
        conditions: per window, (K_w, D * cond_hidden_ratio) adaLN conditions (params dtype).
        y_xattn: per window, (K_w * L, D) caption tokens after ``y_proj_xattn`` + SiLU (params dtype).
        shapes: per window, (T, H, W) in patches; tpcs: per window, tokens per chunk.
    """

    hidden: torch.Tensor | None
    rope_sin: torch.Tensor
    rope_cos: torch.Tensor
    layout: PackedLayout
    conditions: list[torch.Tensor]
    y_xattn: list[torch.Tensor]
    shapes: list[tuple[int, int, int]]
    tpcs: list[int]


def patch_grid(cfg, x_shape) -> tuple[int, int, int]:
    """(T, H, W) patches of a (C, T, H, W) latent: what the patch embedding (Conv3d, kernel =
    stride = (t_patch_size, patch_size, patch_size)) gives, without computing it.

    Raises:
        ValueError: the channel count does not fit the model (``in_channels``, or 16 with
            ``half_channel_vae``), checked here so every pipeline stage rejects the same input.
    """
    want = LATENT_CHANNELS if cfg.half_channel_vae else cfg.in_channels
    if len(x_shape) != 4 or x_shape[0] != want:
        raise ValueError(f"x must be ({want}, T, H, W) latents, got {tuple(x_shape)}")
    p, pt = cfg.patch_size, cfg.t_patch_size
    return x_shape[1] // pt, x_shape[2] // p, x_shape[3] // p


def unpatchify(cfg, out: torch.Tensor, tp: int, hp: int, wp: int) -> torch.Tensor:
    """(S, pt*p*p*C) float32 output of one window with a (tp, hp, wp) patch grid (:func:`patch_grid`)
    -> (C, T, H, W) latent (reference ``unpatchify``), then the ``half_channel_vae`` slice and
    ``/ x_rescale_factor``."""
    p, pt, co = cfg.patch_size, cfg.t_patch_size, cfg.out_channels
    x = out.view(tp, hp, wp, pt, p, p, co).permute(6, 0, 3, 1, 4, 2, 5)
    x = x.reshape(co, tp * pt, hp * p, wp * p)
    if cfg.half_channel_vae:
        x = x[:LATENT_CHANNELS]
    return x / cfg.x_rescale_factor


def pack_step(model, windows: list[PackedWindow], kv_tokens: int, cross_per_chunk: bool = True,
              embed: bool = True) -> PackedStep:
    """Embeddings and metadata of ``model.forward_packed(windows, kv)`` for a key buffer of
    ``kv_tokens`` tokens; ``embed=False`` skips the patch embedding (pipeline stages after the first).

    Raises:
        ValueError: inconsistent window shapes, key ranges or destinations outside the buffer.
    """
    embedded, tpcs, shapes, ropes, conds, ys = [], [], [], [], [], []
    dtype, dev = model.params_dtype, model.device
    for w in windows:
        segments = w.check()
        tp, hp, wp = patch_grid(model.cfg, w.x.shape)
        if embed:
            x = model.embed_x(w.x)
            embedded.append(x[0].flatten(1).transpose(0, 1))
        frames = tp // w.k
        tpcs.append(frames * hp * wp)
        shapes.append((tp, hp, wp))
        ropes.append(model.rope_rows(segments, frames, hp, wp))
        conds.append(model.condition(w.t.float(), w.caption_dropout, w.distill_dt).to(dtype))
        ys.append(model.y_embedder.xattn(w.y.to(dev, torch.float32)).flatten(0, 1).to(dtype))
    lay = packed_layout(windows, tpcs, kv_tokens, cross_per_chunk)
    hidden = torch.cat(embedded).to(dtype).contiguous() if embed else None  # (S, D), S = windows x (T H W)
    del embedded
    sin, cos = torch.cat(ropes).to(dev).tensor_split(2, dim=-1)
    return PackedStep(hidden, sin, cos, lay, conds, ys, shapes, tpcs)


class AbsentLayer(nn.Module):
    """Placeholder of a DiT layer another pipeline stage holds (no weights; calling it raises)."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"DiT layer {self.layer} is held by another pipeline stage")
