"""The engine's KV pool: K/V storage of every job, allocated once, handed out in regions.

Per layer one K and one V tensor of shape (num_blocks * block_tokens, G, Dh) (dtype of the
DiT's params), zero-filled at construction; nothing is allocated per step. A job receives a
*region*: a contiguous run of blocks, in which it keeps its ring of clean-chunk K/V and the
K/V of its current windows (layout: :mod:`cluster.engine.kv_layout`). Because a region is
contiguous, a chunk's keys [ring | window] are one slice of the layer tensor and attention
reads them in place (:class:`stages.dit.attention.SdpaRangeAttention` takes views; a
varlen/MagiAttention kernel takes the ranges). Regions are returned with :meth:`KVPool.release`.

Allocation is first-fit over the free runs (neighbouring free runs merge on release).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PoolRegion:
    """A contiguous run of pool blocks: tokens [start, start + tokens)."""

    first_block: int
    num_blocks: int
    block_tokens: int

    @property
    def start(self) -> int:
        return self.first_block * self.block_tokens

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_tokens


class KVPool:
    """Preallocated per-layer K/V tensors (see module docstring).

    Args:
        num_layers: DiT layers.
        num_blocks: blocks in the pool; block_tokens: tokens per block.
        num_groups, head_dim: K/V heads (query groups) and head dim.
        dtype, device: storage dtype (the DiT's params dtype) and device.

    Raises:
        ValueError: a non-positive size.
    """

    def __init__(self, *, num_layers: int, num_blocks: int, block_tokens: int, num_groups: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_tokens", block_tokens),
                        ("num_groups", num_groups), ("head_dim", head_dim)):
            if v <= 0:
                raise ValueError(f"KV pool {name} must be positive, got {v}")
        self.num_layers, self.num_blocks, self.block_tokens = num_layers, num_blocks, block_tokens
        self.num_tokens = num_blocks * block_tokens
        shape = (self.num_tokens, num_groups, head_dim)
        self._k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free: list[tuple[int, int]] = [(0, num_blocks)]  # (first block, count), sorted

    # ----- storage -----------------------------------------------------------------
    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of layer ``i``, each (num_tokens, G, Dh): the packed key buffer."""
        return self._k[i], self._v[i]

    @staticmethod
    def bytes_per_token(num_layers: int, num_groups: int, head_dim: int, element_size: int) -> int:
        """Bytes of one token's K and V over ``num_layers`` layers of (G, Dh) elements of
        ``element_size`` bytes: ``2 * num_layers * G * Dh * element_size`` (what a pool of these
        dimensions holds per token; the fit planner sizes pools with it)."""
        return 2 * num_layers * num_groups * head_dim * element_size

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K and V over all layers (:meth:`bytes_per_token`)."""
        t = self._k[0]
        return self.bytes_per_token(self.num_layers, t.shape[1], t.shape[2], t.element_size())

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.token_bytes

    def move(self, src: int, dst: int, tokens: int) -> None:
        """Copy tokens [src, src + tokens) to [dst, dst + tokens) in every layer (overlap allowed)."""
        if tokens <= 0 or src == dst:
            return
        overlap = abs(src - dst) < tokens
        for buf in (*self._k, *self._v):
            part = buf[src : src + tokens]
            buf[dst : dst + tokens] = part.clone() if overlap else part

    def apply(self, start: int, tokens: int, fn: Callable[[torch.Tensor], torch.Tensor], keys_only: bool = True) -> None:
        """Replace K (and V unless ``keys_only``) of tokens [start, start + tokens) by ``fn`` of
        them, in every layer."""
        for buf in self._k if keys_only else (*self._k, *self._v):
            buf[start : start + tokens] = fn(buf[start : start + tokens])

    def read(self, start: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer copies (CPU) of K/V tokens [start, start + tokens)."""
        return [(k[start : start + tokens].cpu().clone(), v[start : start + tokens].cpu().clone())
                for k, v in zip(self._k, self._v)]

    def write(self, start: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write per-layer K/V (as returned by :meth:`read`) at token ``start``.

        Raises:
            ValueError: wrong number of layers or a shape mismatch.
        """
        if len(kv) != self.num_layers:
            raise ValueError(f"expected K/V for {self.num_layers} layers, got {len(kv)}")
        for (kb, vb), (k, v) in zip(zip(self._k, self._v), kv):
            if k.shape[1:] != kb.shape[1:] or k.shape != v.shape:
                raise ValueError(f"K/V shape {tuple(k.shape)} does not fit the pool's {tuple(kb.shape[1:])}")
            kb[start : start + k.shape[0]] = k.to(kb.device, kb.dtype)
            vb[start : start + v.shape[0]] = v.to(vb.device, vb.dtype)

    # ----- allocation --------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def can_alloc(self, blocks: int) -> bool:
        return any(n >= blocks for _, n in self._free)

    def alloc(self, blocks: int) -> PoolRegion | None:
        """A contiguous region of ``blocks`` blocks (first fit), or None when no run is long enough.

        Raises:
            ValueError: ``blocks`` is not positive.
        """
        if blocks <= 0:
            raise ValueError(f"blocks must be positive, got {blocks}")
        for i, (first, n) in enumerate(self._free):
            if n >= blocks:
                self._free[i : i + 1] = [(first + blocks, n - blocks)] if n > blocks else []
                return PoolRegion(first, blocks, self.block_tokens)
        return None

    def release(self, region: PoolRegion) -> None:
        """Return ``region`` to the pool.

        Raises:
            ValueError: the region overlaps free blocks (double release).
        """
        a, b = region.first_block, region.first_block + region.num_blocks
        if any(f < b and a < f + n for f, n in self._free):
            raise ValueError(f"region blocks [{a}, {b}) are already free")
        runs = sorted([*self._free, (a, region.num_blocks)])
        merged: list[tuple[int, int]] = []
        for f, n in runs:
            if merged and merged[-1][0] + merged[-1][1] == f:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((f, n))
        self._free = merged
