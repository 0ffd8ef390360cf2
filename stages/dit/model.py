"""MAGI-1 DiT (reference ``VideoDiTModel``) as a plain nn.Module over a packed chunk window.

One *window* (:class:`stages.dit.packed.PackedWindow`) is one reference ``VideoDiTModel.forward``
generalised to K chunks packed along time without a batch dim, each chunk with its own
timestep, caption, key range and RoPE segment. :meth:`MagiDiT.forward_packed` runs many such
windows (jobs x guidance branches, each possibly of its own size) packed as variable-length
sequences in one call, every layer writing the windows' K/V into a packed key buffer (the
engine's KV pool, :mod:`stages.dit.kv_pool`, or a one-off :class:`stages.dit.packed.DenseKV`)
and attending over it in place with per-chunk key ranges (:mod:`stages.dit.packed`,
:mod:`stages.dit.attention`).

No CFG, distillation schedule, env reads or distributed state live here; the engine
(:mod:`cluster.engine.runner`) decides the inputs. Over a parallel mesh a rank keeps the layers of
its pipeline stage (:meth:`MagiDiT.keep_layers`) and runs its part of the forward with
:func:`stages.parallel.pipeline.pipeline_forward` (model and mesh passed in; no mesh lives here).

Quirks of the reference reproduced on purpose (each named where implemented): adaLN caption term from
``null_caption_embedding[-2/-1]`` (:class:`~stages.dit.embed.CaptionEmbedder`), ``weight + 1``
LayerNorms (:class:`~stages.dit.embed.FusedLayerNorm`), float32 RoPE time "rescale"
(:class:`~stages.dit.embed.LearnableRotaryEmbeddingCat`), cross K/V interleaved per kv group
(:class:`~stages.dit.layers.FullyParallelAttention`), the ``(n hn hd) -> (hn n hd)`` permute
with n=2, hn=8 hard-coded before ``linear_proj`` (:func:`~stages.dit.layers._interleave_heads`),
``x_rescale_factor`` and ``half_channel_vae`` (channel duplication in, first 16 out).
With ``cfg.fp8_quant`` every layer but the first and the last holds SmoothQuant e4m3 linears
(:mod:`stages.dit.fp8`, reference ``PerTensorQuantizedFp8Linear`` / ``PerChannelQuantizedFp8Linear``);
their ``linear_proj`` runs without the float32 autocast of the float layers, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from stages.config import DiTConfig
from stages.dit.attention import RangeAttention
from stages.dit.embed import (CaptionEmbedder, FinalLinear, FusedLayerNorm, LearnableRotaryEmbeddingCat, RopeShift,
                              TimestepEmbedder, rope_time_shift)
from stages.dit.flash_attention import default_backend
from stages.dit.layers import LayerContext, TransformerLayer
from stages.dit.packed import KVBuffers, PackedWindow
from stages.dit.step import LATENT_CHANNELS, AbsentLayer, pack_step, unpatchify
from stages.dtypes import torch_dtype



class TransformerBlock(nn.Module):
    """Layer stack + final LayerNorm (reference ``TransformerBlock``; keys ``videodit_blocks.*``)."""

    def __init__(self, cfg: DiTConfig, dtype: torch.dtype):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, dtype, layer_number=n) for n in range(cfg.num_layers))
        self.final_layernorm = FusedLayerNorm(cfg, cfg.hidden_size, dtype)


class MagiDiT(nn.Module):
    """The MAGI-1 video DiT; ``state_dict`` keys/shapes/dtypes equal the reference ``VideoDiTModel``.

    Args:
        cfg: architecture.
        attention: range-attention backend (default SDPA, see :mod:`stages.dit.attention`).
    """

    def __init__(self, cfg: DiTConfig, attention: RangeAttention | None = None):
        super().__init__()
        self.cfg = cfg
        self.attention = attention or default_backend()
        dtype = torch_dtype(cfg.params_dtype)
        p, pt = cfg.patch_size, cfg.t_patch_size
        self.x_embedder = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=(pt, p, p), stride=(pt, p, p), bias=False)
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = CaptionEmbedder(cfg)
        self.rope = LearnableRotaryEmbeddingCat(cfg.hidden_size // cfg.num_attention_heads)
        self.videodit_blocks = TransformerBlock(cfg, dtype)
        self.final_linear = FinalLinear(cfg)

    @property
    def device(self) -> torch.device:
        """Device of the weights; inputs are moved there."""
        return self.x_embedder.weight.device

    @property
    def params_dtype(self) -> torch.dtype:
        """dtype of the transformer-block weights (the reference ``params_dtype``)."""
        layer = next(m for m in self.videodit_blocks.layers if isinstance(m, TransformerLayer))
        return layer.mlp.linear_fc1.weight.dtype

    # ----- pipeline stages --------------------------------------------------------
    def keep_layers(self, layers: range) -> "MagiDiT":
        """Replace every layer outside ``layers`` (global indices) by an :class:`AbsentLayer`
        (its weights leave the model and its ``state_dict``). Returns self.

        Raises:
            ValueError: ``layers`` outside [0, num_layers) or empty.
        """
        if not layers or layers.start < 0 or layers.stop > self.cfg.num_layers:
            raise ValueError(f"layers {layers} outside the model's {self.cfg.num_layers} layers")
        blocks = self.videodit_blocks.layers
        for i in range(len(blocks)):
            if i not in layers and not isinstance(blocks[i], AbsentLayer):
                blocks[i] = AbsentLayer(i)
        return self

    def promote_high_precision(self) -> "MagiDiT":
        """Cast q/k LayerNorms, post-norms and the final LayerNorm to float32 (reference
        ``_high_precision_promoter``; embedders are float32 already). Returns self."""
        for name, mod in self.named_modules():
            if "_xattn" in name:
                continue
            if name.endswith(("q_layernorm", "k_layernorm", "self_attn_post_norm", "mlp_post_norm", "final_layernorm")):
                mod.float()
        return self

    # ----- embeddings -------------------------------------------------------------
    def condition(self, t: torch.Tensor, caption_dropout: torch.Tensor, distill_dt: torch.Tensor | None = None) -> torch.Tensor:
        """adaLN condition per chunk: ``t_embedder(t) (+ t_embedder(dt)) + y_proj_adaln(null[-2 or -1])``.

        Args: t (K,), caption_dropout (K,) bool, distill_dt (K,) or None.
        Returns: (K, hidden_size * cond_hidden_ratio) float32.
        """
        dev = self.device
        emb = self.t_embedder(t.to(dev))
        if distill_dt is not None:
            emb = emb + self.t_embedder(distill_dt.to(dev))
        return emb + self.y_embedder.adaln(caption_dropout.to(dev, torch.bool))

    def caption_tokens(self, y: torch.Tensor, y_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid caption tokens after ``y_proj_xattn`` + SiLU and each chunk's range in them.

        Args: y (K, L, caption_channels), y_mask (K, L).
        Returns: (Ny, hidden) float32 packed tokens (reference ``y_xattn_flat``), (K, 2) int64 ranges.
        """
        proj = self.y_embedder.xattn(y.to(self.device, torch.float32))
        keep = y_mask.to(proj.device, torch.bool)
        flat = proj[keep]
        counts = keep.sum(dim=1).to("cpu", torch.int64)
        ends = torch.cumsum(counts, 0)
        return flat, torch.stack([ends - counts, ends], dim=1)

    def rope_rows(self, segments, frames_per_chunk: int, h: int, w: int) -> torch.Tensor:
        """(S, 6 * head_dim // 8) RoPE rows for the window, segment by segment.

        Args:
            segments: ((num_chunks, rope_frame_offset in latent frames), ...).
            frames_per_chunk: patch frames per chunk (latent frames / t_patch_size).
            h, w: patches per frame along H and W.
        See :meth:`LearnableRotaryEmbeddingCat.table`.
        """
        pt = self.cfg.t_patch_size
        rows = [self.rope.table(off // pt, n * frames_per_chunk, h, w) for n, off in segments]
        return torch.cat(rows, dim=0)

    def embed_x(self, x: torch.Tensor) -> torch.Tensor:
        """(C, T, H, W) latent -> (1, D, T/pt, H/p, W/p) float32 patch embedding, after
        ``x_rescale_factor`` and the ``half_channel_vae`` channel duplication."""
        x = x.to(self.device, torch.float32) * self.cfg.x_rescale_factor
        if self.cfg.half_channel_vae:
            if x.shape[0] != LATENT_CHANNELS:
                raise ValueError(f"half_channel_vae expects {LATENT_CHANNELS} latent channels, got {x.shape[0]}")
            x = torch.cat([x, x], dim=0)
        return self.x_embedder(x.unsqueeze(0))

    # ----- forward ----------------------------------------------------------------
    def tokens_per_chunk(self, frames: int, h: int, w: int) -> int:
        """Tokens of one chunk of ``frames`` latent frames of size (h, w) latent pixels
        (:meth:`stages.config.DiTConfig.tokens_per_chunk`)."""
        return self.cfg.tokens_per_chunk(frames, h, w)

    def forward_packed(self, windows: list[PackedWindow], kv: KVBuffers, cross_per_chunk: bool = True) -> list[torch.Tensor]:
        """One forward over several windows packed as variable-length sequences.

        Args:
            windows: see :class:`stages.dit.packed.PackedWindow` (each may have its own H, W).
            kv: per-layer key buffer; every window chunk's K/V are written at its ``kv_dest``
                before the layer attends, key ranges index this buffer.
            cross_per_chunk: cross-attention computed chunk by chunk (default; a chunk's output
                is then independent of other chunks' captions bit for bit) or per window.

        Returns:
            per window, the velocity (16 or out_channels, T, H, W) float32.

        Raises:
            ValueError: inconsistent window shapes, key ranges or destinations outside ``kv``.
            RuntimeError: a layer was dropped (:meth:`keep_layers`): a pipeline stage's part of
                the model runs through :func:`stages.parallel.pipeline.pipeline_forward`.
        """
        if not windows:
            return []
        step = pack_step(self, windows, kv.num_tokens, cross_per_chunk)
        hidden, lay, dev = step.hidden, step.layout, self.device
        ctx = LayerContext(
            rope_sin=step.rope_sin, rope_cos=step.rope_cos, token_chunk=lay.token_chunk.to(dev),
            conditions=step.conditions, self_attn=self.attention.prepare(lay.self_spec, dev),
            cross_attn=self.attention.prepare(lay.cross_spec, dev), kv_index=lay.kv_index.to(dev), kv=kv,
            y_xattn=step.y_xattn, y_valid=lay.y_valid.to(dev), attention=self.attention,
        )
        for n, layer in enumerate(self.videodit_blocks.layers):
            hidden, _ = layer(hidden, ctx, n)
        return self.unpatchify_windows(self.head(hidden), step.shapes)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, D) last-layer hidden states -> (S, pt*p*p*C) float32: final LayerNorm + final linear."""
        hidden = self.videodit_blocks.final_layernorm(hidden.float())
        return self.final_linear(hidden.float())

    def unpatchify_windows(self, out: torch.Tensor, shapes: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """(S, pt*p*p*C) packed output -> per window (C, T, H, W) velocity (:func:`stages.dit.step.unpatchify`)."""
        velocities, start = [], 0
        for (tp, hp, wp) in shapes:
            n = tp * hp * wp
            velocities.append(unpatchify(self.cfg, out[start : start + n], tp, hp, wp))
            start += n
        return velocities

    def rope_time_shift(self, k: torch.Tensor, frames: int) -> torch.Tensor:
        """Move post-RoPE keys (S, G, Dh) ``frames`` latent frames earlier in time
        (:func:`stages.dit.embed.rope_time_shift` with this model's bands)."""
        return rope_time_shift(k, self.rope.bands.detach().float(), frames, self.cfg.t_patch_size)

    def rope_shift(self, frames: int) -> RopeShift:
        """Picklable ``k -> rope_time_shift(k, frames)`` (for the ranks of a parallel mesh)."""
        return RopeShift(tuple(self.rope.bands.detach().float().cpu().tolist()), int(frames), self.cfg.t_patch_size)
