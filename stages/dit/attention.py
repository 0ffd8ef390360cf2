"""Range attention: the one attention interface the DiT uses (self- and cross-attention).

Semantics (reference ``magi_attention.flex_flash_attn_func`` / the ``flash_attn_func``
loop in reference ``FullyParallelAttention.core_attention``): row ``i`` of
``q_ranges``/``k_ranges`` says that queries ``[q_ranges[i,0], q_ranges[i,1])`` attend to
keys ``[k_ranges[i,0], k_ranges[i,1])``; several rows touching one query are a union.
Softmax scale ``1/sqrt(head_dim)``, not causal, grouped-query attention maps query head
``h`` to key/value group ``h // (Hq // G)`` (flash-attn convention). A query that sees no
key gets a zero output (what flash-attn returns for an empty key segment).

Backends: :class:`SdpaRangeAttention` (PyTorch SDPA with a boolean mask built from the
ranges; runs everywhere, used on CPU). A flash-attn varlen / MagiAttention backend for
GPUs only has to implement :class:`RangeAttention`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class RangeAttention(Protocol):
    """Attention of query ranges over key ranges (see module docstring)."""

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: torch.Tensor, k_ranges: torch.Tensor
    ) -> torch.Tensor:
        """Args:
            q: (Sq, Hq, Dh) queries.
            k, v: (Sk, G, Dh) keys / values, ``Hq % G == 0``.
            q_ranges, k_ranges: (N, 2) int64 [start, end) token ranges.

        Returns:
            (Sq, Hq, Dh) attention output, dtype of ``q``.
        """
        ...


def ranges_to_mask(q_ranges: torch.Tensor, k_ranges: torch.Tensor, sq: int, sk: int, device=None) -> torch.Tensor:
    """Boolean (Sq, Sk) mask, True where a query may attend to a key (union over rows).

    Raises:
        ValueError: a range is reversed or lies outside [0, Sq] / [0, Sk].
    """
    if q_ranges.shape != k_ranges.shape or q_ranges.ndim != 2 or q_ranges.shape[1] != 2:
        raise ValueError(f"q_ranges {tuple(q_ranges.shape)} and k_ranges {tuple(k_ranges.shape)} must both be (N, 2)")
    qr = q_ranges.to("cpu", torch.int64)
    kr = k_ranges.to("cpu", torch.int64)
    if qr.numel() and ((qr[:, 0] > qr[:, 1]).any() or qr.min() < 0 or qr.max() > sq):
        raise ValueError(f"q_ranges out of [0, {sq}]: {qr.tolist()}")
    if kr.numel() and ((kr[:, 0] > kr[:, 1]).any() or kr.min() < 0 or kr.max() > sk):
        raise ValueError(f"k_ranges out of [0, {sk}]: {kr.tolist()}")
    q_idx = torch.arange(sq)
    k_idx = torch.arange(sk)
    mask = torch.zeros(sq, sk, dtype=torch.bool)
    for (qs, qe), (ks, ke) in zip(qr.tolist(), kr.tolist()):
        rows = (q_idx >= qs) & (q_idx < qe)
        cols = (k_idx >= ks) & (k_idx < ke)
        mask |= rows[:, None] & cols[None, :]
    return mask.to(device) if device is not None else mask


class SdpaRangeAttention:
    """:class:`RangeAttention` through ``torch.nn.functional.scaled_dot_product_attention``.

    Builds the dense (Sq, Sk) boolean mask, so memory is O(Sq * Sk) bits: fine for CPU and
    tiny models; use a varlen kernel for real sizes.
    """

    def __call__(self, q, k, v, q_ranges, k_ranges):
        sq, hq, _ = q.shape
        sk, g, _ = k.shape
        if hq % g:
            raise ValueError(f"query heads {hq} not a multiple of kv groups {g}")
        mask = ranges_to_mask(q_ranges, k_ranges, sq, sk, device=q.device)
        if sk == 0:
            return torch.zeros_like(q)
        seen = mask.any(dim=1)
        safe = mask | ~seen[:, None]  # fully masked rows would give NaN; zeroed below
        if g != hq:
            k = k.repeat_interleave(hq // g, dim=1)
            v = v.repeat_interleave(hq // g, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=safe,
        )[0].transpose(0, 1)
        return out * seen[:, None, None].to(out.dtype)


def default_backend() -> RangeAttention:
    """The backend used when a model is built without one (SDPA)."""
    return SdpaRangeAttention()
