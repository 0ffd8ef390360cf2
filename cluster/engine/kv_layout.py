"""One job's K/V tensors in its KV-pool region: the torch half of the job's KV bookkeeping.

Where each chunk's K/V are (areas, ring base, held chunks, RoPE base) is decided in chunk
slots by the scheduler's :class:`cluster.scheduler.kv_ring.KVRing`; :class:`JobKV` turns slots
into token positions of the pool and executes what the plan asks of the tensors: re-basing
moves, RoPE key rotation, snapshot export / load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from cluster.scheduler.kv_ring import KVMove, KVRing
from stages.dit.kv_pool import KVPool, PoolRegion


class JobKV:
    """One job's K/V in its pool region.

    Args:
        pool: the engine's pool; region: the job's blocks; tpc: tokens per chunk;
        ring: the job's KV bookkeeping (its ``areas`` must fit the region).

    Raises:
        ValueError: the region is smaller than the areas.
    """

    def __init__(self, pool: KVPool, region: PoolRegion, tpc: int, ring: KVRing):
        if ring.areas.total * tpc > region.tokens:
            raise ValueError(f"region of {region.tokens} tokens cannot hold {ring.areas.total} chunks of {tpc} tokens")
        self.pool, self.region, self.tpc, self.ring = pool, region, tpc, ring

    def pos(self, slot: int) -> int:
        """Pool token position of chunk slot ``slot`` (:mod:`cluster.scheduler.kv_ring`)."""
        return self.region.start + slot * self.tpc

    def token_ranges(self, slots: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Slot ranges [lo, hi) -> pool token ranges."""
        return [(self.pos(lo), self.pos(hi)) for lo, hi in slots]

    @property
    def chunks(self) -> list[int]:
        """Clean chunks whose K/V the job holds, ascending."""
        return list(self.ring.held)

    # ----- executing the plan ----------------------------------------------------------
    def move(self, moves: Iterable[KVMove]) -> None:
        """Copy chunks between slots, in the given order (:meth:`KVRing.prepare`)."""
        for m in moves:
            self.pool.move(self.pos(m.src), self.pos(m.dst), self.tpc)

    def shift_keys(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the held chunks' keys by ``fn(keys)`` (RoPE re-basing)."""
        for c in self.ring.held:
            self.pool.apply(self.pos(self.ring.history_slot(c)), self.tpc, fn)

    # ----- snapshot ---------------------------------------------------------------
    def export(self) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per held chunk, per-layer (k, v) CPU copies."""
        return {c: self.pool.read(self.pos(self.ring.history_slot(c)), self.tpc) for c in self.ring.held}

    def load(self, chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Hold ``chunks`` (as returned by :meth:`export`), placed from the oldest.

        Raises:
            ValueError: the chunks do not fit the ``history`` area.
        """
        self.ring.load(list(chunks))
        for c in self.ring.held:
            self.pool.write(self.pos(self.ring.history_slot(c)), chunks[c])

    # ----- accounting -------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """Bytes of the clean-chunk K/V held (the ring)."""
        return len(self.ring.held) * self.tpc * self.pool.token_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes of the job's pool region (ring + window areas)."""
        return self.region.tokens * self.pool.token_bytes
