"""Inputs of a packed DiT forward: many windows (jobs x guidance branches) in one call.

A :class:`PackedWindow` is one reference batch element generalised (one job's window for one
guidance branch): K chunks of latent frames with per-chunk timestep, caption and adaLN
null-row choice, RoPE segments, and for every chunk (a) the key ranges its queries read in the
packed key buffer and (b) the offset where the chunk's own K/V are written into that buffer.
The key buffer (:class:`KVBuffers`) is one (Sk, G, Dh) K and V tensor per layer: the engine's
KV pool (:mod:`stages.dit.kv_pool`) or, for one-off forwards, a :class:`DenseKV`.

Windows never see each other's tokens. Attention groups (:class:`stages.dit.attention.RangeSpec`)
are single chunks, in self-attention (a chunk's queries read only its key ranges) and in
cross-attention (a chunk's queries read only its own caption's valid tokens): a chunk's output
depends on no other chunk's caption and on nothing else in the batch, bit for bit (the
chunk-wise prompt and batching exactness tests rely on it). A one-off forward with
``cross_per_chunk=False`` keeps one cross-attention call per window (masked),
the numerics its parity tests (fp8) were pinned with; both are the same attention.
Per-window quantities (adaLN condition, gates, caption projections) are computed per window so
that a window's numbers do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from stages.dit.attention import RangeSpec


class KVBuffers(Protocol):
    """Per-layer packed key buffer: ``layer(i) -> (k, v)``, each (num_tokens, G, Dh)."""

    num_tokens: int

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class DenseKV:
    """A private key buffer for one forward: per layer (tokens, G, Dh) K and V, optionally
    starting with ``history`` (per-layer (Sh, G, Dh) K/V copied into the first Sh tokens).

    Raises:
        ValueError: ``history`` does not have ``num_layers`` entries.
    """

    def __init__(self, num_layers: int, tokens: int, groups: int, head_dim: int, dtype, device, history=None):
        if history is not None and len(history) != num_layers:
            raise ValueError(f"history has {len(history)} layers, model has {num_layers}")
        self.num_tokens = tokens
        self._k = [torch.zeros(tokens, groups, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self._v = [torch.zeros(tokens, groups, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        for i, (hk, hv) in enumerate(history or ()):
            self._k[i][: hk.shape[0]] = hk.to(device, dtype)
            self._v[i][: hv.shape[0]] = hv.to(device, dtype)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k[i], self._v[i]


@dataclass
class PackedWindow:
    """One window of a packed forward (see module docstring).

    Attributes:
        x: (C, T, H, W) latent frames of the K chunks in order (T = K * frames per chunk).
        t: (K,) float32 timestep per chunk (0 noise, 1 clean).
        y: (K, L, caption_channels) caption per chunk; y_mask: (K, L), 1 = valid token.
        caption_dropout: (K,) bool, adaLN row ``null_caption_embedding[-1]`` if True else ``[-2]``.
        key_ranges: per chunk, the [start, end) token ranges (union) of the key buffer its
            queries attend to.
        kv_dest: per chunk, the key-buffer token offset where its K/V are written (every
            layer writes the window's K/V before attending).
        segments: ((num_chunks, rope_frame_offset), ...) RoPE segments covering the K chunks
            (reference ``slice_point * chunk_width`` offsets); default one segment at 0.
        distill_dt: optional (K,) shortcut step size (reference distill dt embedding).
    """

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    y_mask: torch.Tensor
    caption_dropout: torch.Tensor
    key_ranges: Sequence[Sequence[tuple[int, int]]]
    kv_dest: Sequence[int]
    segments: tuple[tuple[int, int], ...] | None = None
    distill_dt: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.t.shape[0])

    def check(self) -> tuple[tuple[int, int], ...]:
        """Validate shapes; returns the segments.

        Raises:
            ValueError: inconsistent chunk counts, frames or segments.
        """
        k = self.k
        if self.x.ndim != 4:
            raise ValueError(f"x must be (C, T, H, W), got {tuple(self.x.shape)}")
        if k == 0 or self.x.shape[1] % k:
            raise ValueError(f"x has {self.x.shape[1]} frames, not a multiple of {k} chunks")
        if len(self.key_ranges) != k or len(self.kv_dest) != k:
            raise ValueError(f"key_ranges ({len(self.key_ranges)}) and kv_dest ({len(self.kv_dest)}) need {k} entries")
        segments = tuple(self.segments) if self.segments is not None else ((k, 0),)
        if sum(n for n, _ in segments) != k:
            raise ValueError(f"segments {segments} do not cover {k} chunks")
        return segments


@dataclass(frozen=True)
class PackedLayout:
    """Token bookkeeping of a packed forward (built by :func:`packed_layout`).

    Attributes:
        self_spec: self-attention rows (group = chunk) over the key buffer.
        cross_spec: cross-attention rows over the valid caption tokens (each chunk over its own
            caption; group = chunk, or window when ``cross_per_chunk`` is False).
        kv_index: (S,) int64 key-buffer position of every packed token.
        token_chunk: (S,) int64 packed chunk index of every token.
        y_valid: (sum K * L,) bool, valid caption tokens in the per-window padded captions.
    """

    self_spec: RangeSpec
    cross_spec: RangeSpec
    kv_index: torch.Tensor
    token_chunk: torch.Tensor
    y_valid: torch.Tensor


def packed_layout(windows: Sequence[PackedWindow], tpcs: Sequence[int], kv_tokens: int,
                  cross_per_chunk: bool = True) -> PackedLayout:
    """Attention rows, K/V destinations and token maps of ``windows`` (tokens per chunk ``tpcs``).
    ``cross_per_chunk``: one cross-attention group per chunk (default) or per window.

    Raises:
        ValueError: a key range or K/V destination outside the key buffer, or two chunks
            writing overlapping K/V.
    """
    self_rows, cross_rows, dest, token_chunk, valid = [], [], [], [], []
    q_off = y_off = chunk_id = 0
    for win_id, (w, tpc) in enumerate(zip(windows, tpcs)):
        mask = w.y_mask.to("cpu", torch.bool)
        valid.append(mask.reshape(-1))
        counts = mask.sum(dim=1).tolist()
        w.check()
        for i in range(w.k):
            q0, q1 = q_off + i * tpc, q_off + (i + 1) * tpc
            for ks, ke in w.key_ranges[i]:
                self_rows.append((q0, q1, int(ks), int(ke), chunk_id))
            cross_rows.append((q0, q1, y_off, y_off + counts[i], chunk_id if cross_per_chunk else win_id))
            d = int(w.kv_dest[i])
            if d < 0 or d + tpc > kv_tokens:
                raise ValueError(f"K/V destination [{d}, {d + tpc}) outside the key buffer of {kv_tokens} tokens")
            dest.append(torch.arange(d, d + tpc, dtype=torch.int64))
            token_chunk.append(torch.full((tpc,), chunk_id, dtype=torch.int64))
            y_off += counts[i]
            chunk_id += 1
        q_off += w.k * tpc
    kv_index = torch.cat(dest)
    if torch.unique(kv_index).numel() != kv_index.numel():
        raise ValueError("two chunks of the packed forward write overlapping K/V positions")
    return PackedLayout(
        self_spec=RangeSpec.from_rows(self_rows, q_off, kv_tokens),
        cross_spec=RangeSpec.from_rows(cross_rows, q_off, y_off),
        kv_index=kv_index,
        token_chunk=torch.cat(token_chunk),
        y_valid=torch.cat(valid),
    )
