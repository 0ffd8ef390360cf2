"""MAGI-1 DiT (reference ``VideoDiTModel``) as a plain nn.Module over a packed chunk window.

One call of :meth:`MagiDiT.forward` is one reference ``VideoDiTModel.forward`` generalised
to a *window* of K chunks packed along time without a batch dim:

* every chunk has its own timestep, caption (+ mask), adaLN null-row choice
  (``caption_dropout``) and key range over keys = [history K/V] + [window tokens];
* the chunks are grouped into *segments* (a reference batch element): each segment has a
  RoPE frame offset, so a window that continues a video gets absolute t-positions
  (reference ``slice_point``) and the unconditional CFG branch (every chunk alone,
  positions restarting at 0) is a window of 1-chunk segments;
* the K/V of chosen chunks can be returned for every layer, for the engine's KV cache.

No CFG, distillation schedule, env reads or distributed state live here; the engine
(:mod:`cluster.engine.runner`) decides the inputs. Quirks of the reference reproduced on
purpose (each named where implemented): adaLN caption term from
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

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from stages.config import DiTConfig
from stages.dit.attention import RangeAttention, default_backend
from stages.dit.embed import CaptionEmbedder, FinalLinear, FusedLayerNorm, LearnableRotaryEmbeddingCat, TimestepEmbedder
from stages.dit.layers import KV, LayerContext, TransformerLayer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LATENT_CHANNELS = 16


@dataclass
class DiTInput:
    """Inputs of one DiT forward over a window of K chunks.

    Attributes:
        x: (C, T, H, W) latent frames of the K chunks in window order (C = 16 latent
            channels, or ``in_channels``; T = K * frames per chunk; H, W latent pixels).
        t: (K,) float32 timestep per chunk (0 noise, 1 clean).
        y: (K, L, caption_channels) caption embedding per chunk.
        y_mask: (K, L) int/bool, 1 = valid caption token.
        kv_range: (K, 2) int64 [start, end) in tokens over keys = [history | window].
        caption_dropout: (K,) bool; adaLN uses ``null_caption_embedding[-1]`` if True else
            ``[-2]`` (reference ``caption_dropout_mask``).
        segments: ((num_chunks, rope_frame_offset), ...) covering the K chunks in order;
            a segment's RoPE t-positions start at ``rope_frame_offset`` latent frames
            (reference ``slice_point * chunk_width``).
            Default: one segment at offset 0.
        distill_dt: optional (K,) float32 shortcut step size; when given,
            ``t_embedder(distill_dt)`` is added to the timestep embedding (reference
            ``engine_config.distill`` branch of ``get_embedding_and_meta``).
        history: optional per-layer cached (k, v), each (Sh, G, Dh): K/V of earlier clean
            chunks in key order (the first Sh keys).
        return_kv: window chunk indices whose per-layer K/V to return.
    """

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    y_mask: torch.Tensor
    kv_range: torch.Tensor
    caption_dropout: torch.Tensor
    segments: tuple[tuple[int, int], ...] | None = None
    distill_dt: torch.Tensor | None = None
    history: list[KV] | None = None
    return_kv: tuple[int, ...] = ()


@dataclass
class DiTOutput:
    """``velocity`` (16 or out_channels, T, H, W) float32 like ``x``; ``kv[c]`` = per-layer
    (k, v) of window chunk c, each (tokens_per_chunk, G, Dh), for c in ``return_kv``."""

    velocity: torch.Tensor
    kv: dict[int, list[KV]] = field(default_factory=dict)


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
        dtype = _DTYPES[cfg.params_dtype]
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
        return self.videodit_blocks.layers[0].mlp.linear_fc1.weight.dtype

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
    def forward(self, inp: DiTInput) -> DiTOutput:
        """Run the DiT over one window (see :class:`DiTInput`); returns :class:`DiTOutput`.

        Raises:
            ValueError: inconsistent shapes (chunk count vs T, segments, kv_range, history);
                a key range outside [0, history + window tokens].
        """
        cfg = self.cfg
        k_chunks = int(inp.t.shape[0])
        if inp.x.ndim != 4:
            raise ValueError(f"x must be (C, T, H, W), got {tuple(inp.x.shape)}")
        t_frames = inp.x.shape[1]
        if k_chunks == 0 or t_frames % k_chunks:
            raise ValueError(f"x has {t_frames} frames, not a multiple of {k_chunks} chunks")
        segments = tuple(inp.segments) if inp.segments is not None else ((k_chunks, 0),)
        if sum(n for n, _ in segments) != k_chunks:
            raise ValueError(f"segments {segments} do not cover {k_chunks} chunks")
        x = self.embed_x(inp.x)
        _, _, tp, hp, wp = x.shape
        frames = tp // k_chunks
        tpc = frames * hp * wp
        hidden = x[0].flatten(1).transpose(0, 1).to(self.params_dtype).contiguous()  # (S, D), S = (T H W)
        rope = self.rope_rows(segments, frames, hp, wp).to(hidden.device)
        y_flat, y_ranges = self.caption_tokens(inp.y, inp.y_mask)
        ctx = self._context(rope, k_chunks, tpc, inp, y_flat.to(self.params_dtype), y_ranges)
        cond = self.condition(inp.t.float(), inp.caption_dropout, inp.distill_dt).to(self.params_dtype)
        history = inp.history or [None] * cfg.num_layers
        if len(history) != cfg.num_layers:
            raise ValueError(f"history has {len(history)} layers, model has {cfg.num_layers}")
        kv_out: dict[int, list[KV]] = {i: [] for i in inp.return_kv}
        for layer, hist in zip(self.videodit_blocks.layers, history):
            hidden, (k, v) = layer(hidden, cond, ctx, hist)
            for i in inp.return_kv:
                kv_out[i].append((k[i * tpc : (i + 1) * tpc].clone(), v[i * tpc : (i + 1) * tpc].clone()))
        hidden = self.videodit_blocks.final_layernorm(hidden.float())
        out = self.final_linear(hidden.float())
        return DiTOutput(velocity=self._unpatchify(out, tp, hp, wp), kv=kv_out)

    def _context(self, rope, k_chunks, tpc, inp: DiTInput, y_flat, y_ranges) -> LayerContext:
        sin, cos = rope.tensor_split(2, dim=-1)
        starts = torch.arange(k_chunks, dtype=torch.int64) * tpc
        kv_range = inp.kv_range.to("cpu", torch.int64)
        if tuple(kv_range.shape) != (k_chunks, 2):
            raise ValueError(f"kv_range must be ({k_chunks}, 2), got {tuple(kv_range.shape)}")
        return LayerContext(
            rope_sin=sin,
            rope_cos=cos,
            token_chunk=torch.arange(k_chunks, device=rope.device).repeat_interleave(tpc),
            q_ranges=torch.stack([starts, starts + tpc], dim=1),
            kv_ranges=kv_range,
            y_xattn=y_flat,
            y_ranges=y_ranges,
            attention=self.attention,
        )

    def _unpatchify(self, out: torch.Tensor, tp: int, hp: int, wp: int) -> torch.Tensor:
        """(S, pt*p*p*C) -> (C, T, H, W) (reference ``unpatchify``), then the
        ``half_channel_vae`` slice and ``/ x_rescale_factor``."""
        cfg = self.cfg
        p, pt, co = cfg.patch_size, cfg.t_patch_size, cfg.out_channels
        x = out.view(tp, hp, wp, pt, p, p, co).permute(6, 0, 3, 1, 4, 2, 5)
        x = x.reshape(co, tp * pt, hp * p, wp * p)
        if cfg.half_channel_vae:
            x = x[:LATENT_CHANNELS]
        return x / cfg.x_rescale_factor
