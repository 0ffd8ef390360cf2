"""Transformer layer of the MAGI-1 DiT (reference ``TransformerLayer`` and its parts).

Tokens are packed without a batch dim: hidden states are (S, D) with S ordered
(chunk, T, H, W); per-chunk quantities (adaLN gates) are gathered with a token->chunk map.
Names of modules/parameters equal the reference so state_dict keys match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.config import DiTConfig
from stages.dit.attention import RangeAttention
from stages.dit.embed import FusedLayerNorm, apply_rotary
from stages.dit.fp8 import PER_CHANNEL, PER_TENSOR, QuantizedFp8Linear, is_quantized_layer, make_linear

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LayerContext:
    """Per-forward tensors shared by every layer (built once by :class:`stages.dit.model.MagiDiT`).

    Attributes:
        rope_sin, rope_cos: (S, R) float32 RoPE table rows for the packed tokens.
        token_chunk: (S,) int64 packed chunk index of every token.
        conditions: per window, (K_w, hidden * cond_hidden_ratio) adaLN condition of its chunks.
        self_attn: the backend's prepared self-attention rows over the key buffer.
        cross_attn: the backend's prepared cross-attention rows (each chunk over its caption).
        kv_index: (S,) int64 key-buffer position where every token's K/V are written.
        kv: the key buffer (``layer(i) -> (k, v)``, :class:`stages.dit.packed.KVBuffers`).
        y_xattn: per window, (K_w * L, D) caption tokens after ``y_proj_xattn`` + SiLU (padded).
        y_valid: (sum K_w * L,) bool, the valid caption tokens among them.
        attention: the :class:`RangeAttention` backend.
        cp: with context parallelism, the micro-batch's :class:`stages.parallel.ulysses.Ulysses`;
            then ``rope_*``, ``token_chunk`` cover this rank's L local tokens, while ``kv_index``
            and the attention specs cover all n tokens of the micro-batch (heads split).
    """

    rope_sin: torch.Tensor
    rope_cos: torch.Tensor
    token_chunk: torch.Tensor
    conditions: list[torch.Tensor]
    self_attn: Any
    cross_attn: Any
    kv_index: torch.Tensor
    kv: Any
    y_xattn: list[torch.Tensor]
    y_valid: torch.Tensor
    attention: RangeAttention
    cp: Any = None


class AdaModulateLayer(nn.Module):
    """``Linear(SiLU(c))`` -> 2 * hidden gates (reference ``AdaModulateLayer``)."""

    def __init__(self, cfg: DiTConfig, dtype: torch.dtype):
        super().__init__()
        cond = int(cfg.hidden_size * cfg.cond_hidden_ratio)
        out = int(cfg.hidden_size * cfg.cond_gating_ratio * 2)
        self.act = nn.SiLU()
        self.proj = nn.Sequential(nn.Linear(cond, out, bias=True, dtype=dtype))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(c))


class CustomLayerNormLinear(nn.Module):
    """Pre-attention LayerNorm (plain torch LayerNorm, no +1) and the q, qx, k, v projections
    (per-tensor fp8 linears in quantized layers, :mod:`stages.dit.fp8`)."""

    def __init__(self, cfg: DiTConfig, q_size: int, kv_size: int, dtype: torch.dtype, quantized: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layernorm_epsilon, dtype=dtype)
        for name, size in (("q", q_size), ("qx", q_size), ("k", kv_size), ("v", kv_size)):
            setattr(self, name, make_linear(d, size, dtype, quantized=quantized, kind=PER_TENSOR))


class FullyParallelAttention(nn.Module):
    """Self-attention (over the packed key buffer: cached clean chunks + windows) and caption
    cross-attention computed side by side.

    Reference ``FullyParallelAttention``. Quirks reproduced: per-head q/k LayerNorm (``+1``
    gain) in float32 before RoPE; cross-attention K/V come from one linear whose output is
    viewed as (tokens, groups, [k | v]), i.e. k and v interleaved per kv group; only k gets
    ``k_layernorm_xattn``; cross-attention queries get ``q_layernorm_xattn`` and no RoPE.
    """

    def __init__(self, cfg: DiTConfig, dtype: torch.dtype, quantized: bool = False):
        super().__init__()
        self.head_dim = cfg.kv_channels
        self.num_heads = cfg.num_attention_heads
        self.num_groups = cfg.num_query_groups
        q_size = cfg.kv_channels * cfg.num_attention_heads
        kv_size = cfg.kv_channels * cfg.num_query_groups
        self.linear_qkv = CustomLayerNormLinear(cfg, q_size, kv_size, dtype, quantized)
        self.linear_kv_xattn = nn.Linear(int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio), 2 * kv_size, bias=False, dtype=dtype)
        self.linear_proj = make_linear(2 * q_size, cfg.hidden_size, dtype, quantized=quantized, kind=PER_CHANNEL)
        self.q_layernorm = FusedLayerNorm(cfg, self.head_dim, dtype)
        self.q_layernorm_xattn = FusedLayerNorm(cfg, self.head_dim, dtype)
        self.k_layernorm = FusedLayerNorm(cfg, self.head_dim, dtype)
        self.k_layernorm_xattn = FusedLayerNorm(cfg, self.head_dim, dtype)

    def _norm_rope(self, x: torch.Tensor, norm: FusedLayerNorm, ctx: LayerContext) -> torch.Tensor:
        dtype = x.dtype
        x = norm(x.view(x.shape[0], -1, self.head_dim).float())
        return apply_rotary(x, ctx.rope_sin, ctx.rope_cos).to(dtype)

    def self_kv(self, h: torch.Tensor, ctx: LayerContext) -> KV:
        """(S, D) normed hidden -> window keys (after k-norm + RoPE) and values, (S, G, Dh) each."""
        k = self._norm_rope(self.linear_qkv.k(h), self.k_layernorm, ctx)
        v = self.linear_qkv.v(h).view(h.shape[0], -1, self.head_dim)
        return k, v

    def cross_q(self, h: torch.Tensor) -> torch.Tensor:
        """(S, D) normed hidden -> (S, Hq, Dh) cross-attention queries (``q_layernorm_xattn``, no RoPE)."""
        return self.q_layernorm_xattn(self.linear_qkv.qx(h).view(h.shape[0], -1, self.head_dim))

    def cross_kv(self, ctx: LayerContext, groups: range | None = None) -> KV:
        """Caption K/V of the valid caption tokens, (Ny, G, Dh) each (only ``groups`` when given).

        The projection runs per window over the padded captions (row counts do not depend on
        other windows or on caption lengths), then the valid tokens are kept."""
        if groups is None:
            kv = torch.cat([self.linear_kv_xattn(y) for y in ctx.y_xattn])[ctx.y_valid]
        else:  # only the output rows of these groups: (tokens, groups, [k | v]) layout
            w = self.linear_kv_xattn.weight[groups.start * 2 * self.head_dim : groups.stop * 2 * self.head_dim]
            kv = torch.cat([F.linear(y, w) for y in ctx.y_xattn])[ctx.y_valid]
        kv = kv.view(kv.shape[0], -1, 2 * self.head_dim)
        return self.k_layernorm_xattn(kv[..., : self.head_dim]), kv[..., self.head_dim :]

    def cross(self, h: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Cross-attention of every chunk's tokens over its own caption tokens -> (S, Hq * Dh)."""
        q = self.cross_q(h)
        k, v = self.cross_kv(ctx)
        return ctx.attention.attend(q, k, v, ctx.cross_attn).reshape(h.shape[0], -1)

    def forward(self, hidden: torch.Tensor, ctx: LayerContext, layer: int) -> tuple[torch.Tensor, torch.Tensor, KV]:
        """Writes the window's K/V into the key buffer of layer ``layer`` at ``ctx.kv_index``,
        then attends over the buffer in place. Returns (self-attention out (S, Hq*Dh),
        cross-attention out (S, Hq*Dh), the window (k, v) (S, G, Dh) each).
        With ``ctx.cp`` set, runs :meth:`forward_cp`."""
        if ctx.cp is not None:
            return self.forward_cp(hidden, ctx, layer)
        h = self.linear_qkv.layer_norm(hidden)
        k, v = self.self_kv(h, ctx)
        q = self._norm_rope(self.linear_qkv.q(h), self.q_layernorm, ctx)
        k_buf, v_buf = ctx.kv.layer(layer)
        k_buf.index_copy_(0, ctx.kv_index, k.to(k_buf.dtype))
        v_buf.index_copy_(0, ctx.kv_index, v.to(v_buf.dtype))
        core = ctx.attention.attend(q, k_buf, v_buf, ctx.self_attn).reshape(h.shape[0], -1)
        return core, self.cross(h, ctx), (k, v)

    def forward_cp(self, hidden: torch.Tensor, ctx: LayerContext, layer: int) -> tuple[torch.Tensor, torch.Tensor, KV]:
        """Context-parallel :meth:`forward` (Ulysses, ``ctx.cp``): projections on the L local
        tokens, all-to-all to (n, Hq / cp) heads ([q | qx] and [k | v] each in one exchange), K/V
        of this rank's groups written at ``ctx.kv_index``, self- and cross-attention over all n
        tokens with this rank's heads, all-to-all back. Returns (L, Hq*Dh) self- and
        cross-attention outputs and the written (k, v), (n, g, Dh) each."""
        cp, d = ctx.cp, self.head_dim
        h = self.linear_qkv.layer_norm(hidden)
        k, v = self.self_kv(h, ctx)
        q = self._norm_rope(self.linear_qkv.q(h), self.q_layernorm, ctx)
        qq = cp.to_heads(torch.cat([q, self.cross_q(h).to(q.dtype)], dim=-1))
        kv = cp.kv_to_heads(torch.cat([k, v.to(k.dtype)], dim=-1))
        k, v = kv[..., :d], kv[..., d:]
        k_buf, v_buf = ctx.kv.layer(layer)
        k_buf.index_copy_(0, ctx.kv_index, k.to(k_buf.dtype))
        v_buf.index_copy_(0, ctx.kv_index, v.to(v_buf.dtype))
        core = ctx.attention.attend(qq[..., :d], k_buf, v_buf, ctx.self_attn)
        xk, xv = self.cross_kv(ctx, cp.kv_groups[cp.cp_rank])
        cross = ctx.attention.attend(qq[..., d:], xk, xv, ctx.cross_attn)
        out = cp.to_tokens(torch.cat([core, cross.to(core.dtype)], dim=-1))
        return out[..., :d].reshape(h.shape[0], -1), out[..., d:].reshape(h.shape[0], -1), (k, v)


class CustomMLP(nn.Module):
    """LayerNorm -> fc1 -> exact GELU, or silu(a) * b for ``gated_linear_unit`` (a = first half) -> fc2.
    In quantized layers fc1 is a per-tensor and fc2 a per-channel fp8 linear (:mod:`stages.dit.fp8`)."""

    def __init__(self, cfg: DiTConfig, dtype: torch.dtype, quantized: bool = False):
        super().__init__()
        self.glu = cfg.gated_linear_unit
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layernorm_epsilon, dtype=dtype)
        self.linear_fc1 = make_linear(d, 2 * f if self.glu else f, dtype, quantized=quantized, kind=PER_TENSOR)
        self.linear_fc2 = make_linear(f, d, dtype, quantized=quantized, kind=PER_CHANNEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_fc1(self.layer_norm(x))
        if self.glu:
            a, b = x.chunk(2, dim=-1)
            x = F.silu(a) * b
        else:
            x = F.gelu(x)
        return self.linear_fc2(x)


def _interleave_heads(attn: torch.Tensor) -> torch.Tensor:
    """Reference quirk: ``(n hn hd) -> (hn n hd)`` with n=2, hn=8 hard-coded (TP8 layout),
    applied to ``cat([self_attn, cross_attn])`` whatever the real head count."""
    s, width = attn.shape
    return attn.view(s, 2, 8, width // 16).transpose(1, 2).reshape(s, width)


class TransformerLayer(nn.Module):
    """One DiT block (reference ``TransformerLayer``).

    ``x = x + self_attn_post_norm(gate_msa * linear_proj(attn))``;
    ``x = x + mlp_post_norm(gate_mlp * mlp(x))`` with gates
    ``tanh(ada_modulate_layer(condition))`` (softcap 1) per chunk, gating and post-norms in
    float32 (reference ``bias_modulate_add``).
    """

    def __init__(self, cfg: DiTConfig, dtype: torch.dtype, layer_number: int = 0):
        super().__init__()
        quantized = is_quantized_layer(layer_number, cfg.num_layers, cfg.fp8_quant)
        self.ada_modulate_layer = AdaModulateLayer(cfg, dtype)
        self.self_attention = FullyParallelAttention(cfg, dtype, quantized)
        self.self_attn_post_norm = FusedLayerNorm(cfg, cfg.hidden_size, dtype)
        self.mlp = CustomMLP(cfg, dtype, quantized)
        self.mlp_post_norm = FusedLayerNorm(cfg, cfg.hidden_size, dtype)

    @staticmethod
    def _gated_add(x, residual, gate_tok, norm: FusedLayerNorm, dtype) -> torch.Tensor:
        out = norm(x.float() * gate_tok) + residual.float()
        return out.to(dtype)

    def forward(self, hidden: torch.Tensor, ctx: LayerContext, layer: int) -> tuple[torch.Tensor, KV]:
        """Args:
            hidden: (S, D) packed tokens; ctx: the forward's :class:`LayerContext`;
            layer: this layer's index (selects the key buffer).
        Returns:
            (S, D) new hidden states and this layer's window (k, v), (S, G, Dh) each (already
            written into the key buffer).
        """
        dtype = self.mlp.layer_norm.weight.dtype
        gates = torch.cat([self.ada_modulate_layer(c) for c in ctx.conditions])  # per window: batch-independent
        gates = torch.tanh(gates.float()).to(gates.dtype)  # softcap(x, 1)
        gate_msa, gate_mlp = gates.float().chunk(2, dim=-1)
        core, cross, kv = self.self_attention(hidden, ctx, layer)
        attn = _interleave_heads(torch.cat([core, cross], dim=-1))
        del core, cross  # activation peak: free before the MLP
        proj = self.self_attention.linear_proj
        if isinstance(proj, QuantizedFp8Linear):  # reference: the fp8 linear_proj runs without the float32 autocast
            attn = proj(attn)
        else:
            attn = F.linear(attn.float(), proj.weight.float())  # reference: autocast float32 around linear_proj
        hidden = self._gated_add(attn, hidden, gate_msa[ctx.token_chunk], self.self_attn_post_norm, dtype)
        del attn
        mlp = self.mlp(hidden)
        return self._gated_add(mlp, hidden, gate_mlp[ctx.token_chunk], self.mlp_post_norm, dtype), kv
