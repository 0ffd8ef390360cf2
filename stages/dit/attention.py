"""Range attention: the one attention interface the DiT uses (self- and cross-attention).

Semantics (reference ``magi_attention.flex_flash_attn_func`` / the ``flash_attn_func``
loop in reference ``FullyParallelAttention.core_attention``): row ``i`` of
``q_ranges``/``k_ranges`` says that queries ``[q_ranges[i,0], q_ranges[i,1])`` attend to
keys ``[k_ranges[i,0], k_ranges[i,1])``; several rows touching one query are a union.
Softmax scale ``1/sqrt(head_dim)``, not causal, grouped-query attention maps query head
``h`` to key/value group ``h // (Hq // G)`` (flash-attn convention). A query that sees no
key gets a zero output (what flash-attn returns for an empty key segment).

Varlen form (one engine step = many jobs' windows packed into one forward): the key
buffer is a *packed key buffer* (the engine's KV pool for one layer, every job's clean-chunk
ring and current windows in their slots, :mod:`stages.dit.kv_pool`) and the rows carry a
``group`` id: rows of one group (one RoPE segment = one reference batch element: one job's
window of one guidance branch, or one chunk of the unconditional branch) only ever touch
their own queries, so a backend may process groups independently. The metadata is a
:class:`RangeSpec`, built once per forward; ``backend.prepare(spec)`` turns it into whatever
the kernel wants (masks here; ``cu_seqlens`` / MagiAttention ``q_ranges``/``k_ranges`` int32
device tensors for a GPU backend) and every layer calls ``backend.attend(q, k, v, prepared)``.

Backends: :class:`SdpaRangeAttention` (PyTorch SDPA per group; runs everywhere, used on
CPU) and :class:`stages.dit.flash_attention.FlashRangeAttention` (one flash-attn varlen call
per layer, on GPUs); :func:`stages.dit.flash_attention.make_attention` picks one. Another
backend (e.g. MagiAttention) only has to implement :class:`RangeAttention` (``prepare`` +
``attend``; ``__call__`` comes from :class:`RangeAttentionBase`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RangeSpec:
    """Varlen range-attention metadata of one forward, shared by every layer.

    Attributes:
        q_ranges, k_ranges: (N, 2) int64 CPU [start, end) token ranges (see module docstring).
        groups: (N,) int64 CPU group id of every row; rows of a group are consecutive and a
            group's queries are attended only by its own rows.
        sq, sk: query tokens and key-buffer tokens.
    """

    q_ranges: torch.Tensor
    k_ranges: torch.Tensor
    groups: torch.Tensor
    sq: int
    sk: int

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[int, int, int, int, int]], sq: int, sk: int) -> "RangeSpec":
        """Build from ``(q_start, q_end, k_start, k_end, group)`` rows.

        Raises:
            ValueError: a range is reversed or lies outside [0, sq] / [0, sk].
        """
        t = torch.tensor([list(r) for r in rows], dtype=torch.int64).reshape(-1, 5)
        return cls.checked(t[:, 0:2], t[:, 2:4], t[:, 4], sq, sk)

    @classmethod
    def checked(cls, q_ranges, k_ranges, groups, sq: int, sk: int) -> "RangeSpec":
        """Validate and build (see :meth:`from_rows` for the errors)."""
        qr = torch.as_tensor(q_ranges).to("cpu", torch.int64)
        kr = torch.as_tensor(k_ranges).to("cpu", torch.int64)
        if qr.shape != kr.shape or qr.ndim != 2 or qr.shape[1] != 2:
            raise ValueError(f"q_ranges {tuple(qr.shape)} and k_ranges {tuple(kr.shape)} must both be (N, 2)")
        if qr.numel() and ((qr[:, 0] > qr[:, 1]).any() or qr.min() < 0 or qr.max() > sq):
            raise ValueError(f"q_ranges out of [0, {sq}]: {qr.tolist()}")
        if kr.numel() and ((kr[:, 0] > kr[:, 1]).any() or kr.min() < 0 or kr.max() > sk):
            raise ValueError(f"k_ranges out of [0, {sk}]: {kr.tolist()}")
        g = torch.as_tensor(groups).to("cpu", torch.int64).reshape(-1)
        if g.shape[0] != qr.shape[0]:
            raise ValueError(f"groups has {g.shape[0]} rows, ranges have {qr.shape[0]}")
        return cls(qr, kr, g, int(sq), int(sk))

    @property
    def max_seqlen_q(self) -> int:
        return int((self.q_ranges[:, 1] - self.q_ranges[:, 0]).max()) if self.q_ranges.numel() else 0

    @property
    def max_seqlen_k(self) -> int:
        return int((self.k_ranges[:, 1] - self.k_ranges[:, 0]).max()) if self.k_ranges.numel() else 0


class RangeAttention(Protocol):
    """Attention of query ranges over key ranges (see module docstring)."""

    def prepare(self, spec: RangeSpec, device: torch.device | str | None = None) -> Any:
        """Per-forward preparation of ``spec`` (called once, reused by every layer)."""
        ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Any) -> torch.Tensor:
        """Args:
            q: (Sq, Hq, Dh) queries (packed).
            k, v: (Sk, G, Dh) packed key buffer, ``Hq % G == 0``.
            prepared: what :meth:`prepare` returned.

        Returns:
            (Sq, Hq, Dh) attention output, dtype of ``q``.
        """
        ...

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: torch.Tensor, k_ranges: torch.Tensor
    ) -> torch.Tensor:
        """One-shot form: all rows one group (``q_ranges``/``k_ranges`` (N, 2) int64)."""
        ...


class RangeAttentionBase:
    """Gives a backend the one-shot ``__call__`` on top of ``prepare`` + ``attend``."""

    def prepare(self, spec: RangeSpec, device=None) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def attend(self, q, k, v, prepared) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, q, k, v, q_ranges, k_ranges):
        n = int(torch.as_tensor(q_ranges).shape[0])
        spec = RangeSpec.checked(q_ranges, k_ranges, torch.zeros(n, dtype=torch.int64), q.shape[0], k.shape[0])
        return self.attend(q, k, v, self.prepare(spec, q.device))


def ranges_to_mask(q_ranges: torch.Tensor, k_ranges: torch.Tensor, sq: int, sk: int, device=None) -> torch.Tensor:
    """Boolean (Sq, Sk) mask, True where a query may attend to a key (union over rows).

    Raises:
        ValueError: a range is reversed or lies outside [0, Sq] / [0, Sk].
    """
    spec = RangeSpec.checked(q_ranges, k_ranges, torch.zeros(len(q_ranges), dtype=torch.int64), sq, sk)
    mask = torch.zeros(sq, sk, dtype=torch.bool)
    for (qs, qe), (ks, ke) in zip(spec.q_ranges.tolist(), spec.k_ranges.tolist()):
        mask[qs:qe, ks:ke] = True
    return mask.to(device) if device is not None else mask


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(i for i in intervals if i[1] > i[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


@dataclass(frozen=True)
class _Group:
    """One SDPA call: queries [q0, q1), keys = the concatenated ``pieces`` of the key buffer,
    optional (q1 - q0, keys) mask (None = every query sees every key), rows that see nothing."""

    q0: int
    q1: int
    pieces: tuple[tuple[int, int], ...]
    mask: torch.Tensor | None
    seen: torch.Tensor | None


@dataclass(frozen=True)
class SdpaPrepared:
    groups: tuple[_Group, ...]
    covers_all: bool
    sq: int


class SdpaRangeAttention(RangeAttentionBase):
    """:class:`RangeAttention` through ``torch.nn.functional.scaled_dot_product_attention``.

    One SDPA call per group: queries = the group's query span (a view), keys = the merged
    union of its key ranges (a view of the packed key buffer when the union is one interval,
    as for every chunk of the persisted branch; a concatenation of the pieces otherwise, e.g.
    the text branch's [ring | own window]), with a boolean mask only when some query of the
    group does not see every key (O(group queries * group keys) bits). The engine's
    self-attention groups are single chunks, so they need no mask.
    """

    def prepare(self, spec: RangeSpec, device=None) -> SdpaPrepared:
        rows = torch.cat([spec.q_ranges, spec.k_ranges, spec.groups[:, None]], dim=1).tolist()
        groups, covered, start = [], 0, 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i][4] != rows[start][4]:
                groups.append(self._group(rows[start:i], device))
                covered += groups[-1].q1 - groups[-1].q0
                start = i
        return SdpaPrepared(tuple(groups), covered == spec.sq, spec.sq)

    @staticmethod
    def _group(rows: list[list[int]], device) -> _Group:
        q0, q1 = min(r[0] for r in rows), max(r[1] for r in rows)
        pieces = _merge([(r[2], r[3]) for r in rows])
        offsets, total = [], 0
        for s, e in pieces:
            offsets.append(total - s)
            total += e - s
        mask = torch.zeros(q1 - q0, total, dtype=torch.bool)
        for qs, qe, ks, ke, _ in rows:
            if ke <= ks or qe <= qs:
                continue
            shift = next(off for (s, e), off in zip(pieces, offsets) if s <= ks < e)
            mask[qs - q0 : qe - q0, ks + shift : ke + shift] = True
        seen = mask.any(dim=1)
        if bool(mask.all()):
            return _Group(q0, q1, tuple(pieces), None, None)
        safe = mask | ~seen[:, None]  # fully masked rows would give NaN; zeroed in attend
        return _Group(q0, q1, tuple(pieces), safe.to(device), None if bool(seen.all()) else seen.to(device))

    def attend(self, q, k, v, prepared: SdpaPrepared) -> torch.Tensor:
        hq, g = q.shape[1], k.shape[1]
        if hq % g:
            raise ValueError(f"query heads {hq} not a multiple of kv groups {g}")
        if q.shape[0] != prepared.sq:
            raise ValueError(f"prepared for {prepared.sq} queries, got {q.shape[0]}")
        out = torch.empty_like(q) if prepared.covers_all else torch.zeros_like(q)
        for grp in prepared.groups:
            if not grp.pieces:
                out[grp.q0 : grp.q1] = 0
                continue
            kk = self._keys(k, grp.pieces)
            vv = self._keys(v, grp.pieces)
            res = F.scaled_dot_product_attention(
                q[grp.q0 : grp.q1].transpose(0, 1).unsqueeze(0),
                kk.transpose(0, 1).unsqueeze(0),
                vv.transpose(0, 1).unsqueeze(0),
                attn_mask=grp.mask,
                enable_gqa=g != hq,
            )[0].transpose(0, 1)
            if grp.seen is not None:
                res = res * grp.seen[:, None, None].to(res.dtype)
            out[grp.q0 : grp.q1] = res
        return out

    @staticmethod
    def _keys(buf: torch.Tensor, pieces: tuple[tuple[int, int], ...]) -> torch.Tensor:
        if len(pieces) == 1:
            return buf[pieces[0][0] : pieces[0][1]]
        return torch.cat([buf[s:e] for s, e in pieces])

