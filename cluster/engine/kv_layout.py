"""Where one job's K/V live inside its KV-pool region, and which key ranges its chunks read.

A job's region (:class:`stages.dit.kv_pool.PoolRegion`) is cut into areas of whole chunks
(``tpc`` tokens each; their sizes: :mod:`cluster.scheduler.kv_areas`):

* ``main``: ``[ring | window]`` of the branch whose K/V are persisted (cfg_number 3:
  ``cond_prev``, cfg_number 1: the one forward). Global chunk ``c`` sits at chunk position
  ``c - base``, clean ring chunks and window chunks alike, so the keys of any window chunk
  (``kv_range`` = consecutive chunks ending at itself) are ONE slice of the pool tensor and
  are read in place. A clean chunk's K/V are written by its clean re-forward straight into
  its final place: persisting is bookkeeping, not a copy. When the window would run past
  the area, ``base`` moves up to the plan's ``kv_keep_from`` and the held ring chunks (at
  most ``max(noise2clean_kvrange) - 1``, none with the shipped settings at a stage start)
  are moved down once.
* ``text``: the window of the text-guided branch (cfg 3, W + 1 chunks); its keys are
  [ring part in ``main``] + [its own window part], two ranges.
* ``uncond``: the unconditional branch's chunks (cfg 3, W chunks), each attends to itself.
* ``extra``: the self-only copy of the distillation blend (cfg 1, 1 chunk).

The ring holds the clean chunks [``kv_keep_from``, first window chunk) that later plans still
read (DESIGN.md section 3): memory per job is constant in the video length. ``keep_all``
keeps every chunk instead (the reference's whole-video cache; used as the exactness and
memory baseline): ``main`` then spans the whole job and ``base`` stays 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.scheduler.kv_areas import KVAreas
from cluster.scheduler.plan import ChunkSlot, StepPlan
from stages.dit.kv_pool import KVPool, PoolRegion


class JobKV:
    """One job's K/V in its pool region (see module docstring).

    Args:
        pool: the engine's pool; region: the job's blocks; tpc: tokens per chunk.
        areas: the region's layout; keep_all: never drop or move chunks.

    Raises:
        ValueError: the region is smaller than the areas.
    """

    def __init__(self, pool: KVPool, region: PoolRegion, tpc: int, areas: KVAreas, keep_all: bool = False):
        if areas.total * tpc > region.tokens:
            raise ValueError(f"region of {region.tokens} tokens cannot hold {areas.total} chunks of {tpc} tokens")
        self.pool, self.region, self.tpc, self.areas, self.keep_all = pool, region, tpc, areas, keep_all
        self.base = 0
        self._held: list[int] = []
        self.moves = 0  # chunk copies made by re-basing (diagnostics)

    # ----- positions -------------------------------------------------------------
    def main_pos(self, chunk: int) -> int:
        return self.region.start + (chunk - self.base) * self.tpc

    def text_pos(self, i: int) -> int:
        return self.region.start + (self.areas.main + i) * self.tpc

    def uncond_pos(self, i: int) -> int:
        return self.region.start + (self.areas.main + self.areas.text + i) * self.tpc

    def extra_pos(self) -> int:
        return self.region.start + (self.areas.main + self.areas.text + self.areas.uncond) * self.tpc

    # ----- key ranges -------------------------------------------------------------
    def main_ranges(self, slot: ChunkSlot) -> list[tuple[int, int]]:
        """Keys of ``slot`` in the persisted branch: one slice of ``main``."""
        lo, hi = slot.kv_range
        return [(self.main_pos(lo), self.main_pos(hi))]

    def text_ranges(self, slot: ChunkSlot, first: int) -> list[tuple[int, int]]:
        """Keys of ``slot`` in the text branch whose window starts at chunk ``first``:
        ring chunks from ``main``, window chunks from ``text``."""
        lo, hi = slot.kv_range
        out = []
        if lo < min(hi, first):
            out.append((self.main_pos(lo), self.main_pos(min(hi, first))))
        if max(lo, first) < hi:
            out.append((self.text_pos(max(lo, first) - first), self.text_pos(hi - first)))
        return out

    # ----- ring -------------------------------------------------------------------
    @property
    def chunks(self) -> list[int]:
        """Clean chunks whose K/V the job holds, ascending."""
        return list(self._held)

    def prepare(self, plan: StepPlan) -> None:
        """Make room for ``plan``'s window in ``main`` (re-basing if needed) and check that
        every cached chunk it reads is held.

        Raises:
            RuntimeError: a read chunk is not held, or the window cannot fit (a bug).
        """
        first, end = plan.slots[0].chunk, plan.slots[-1].chunk + 1
        if first < self.base or end - self.base > self.areas.main:
            if self.keep_all:
                raise RuntimeError(f"keep_all KV area of {self.areas.main} chunks cannot hold chunk {end - 1}")
            self._rebase(plan.kv_keep_from)
            if end - self.base > self.areas.main:
                raise RuntimeError(f"window [{first}, {end}) does not fit the {self.areas.main}-chunk KV area")
        held = set(self._held)
        missing = sorted({c for s in plan.slots for c in range(s.kv_range[0], min(s.kv_range[1], first))} - held)
        if missing:
            raise RuntimeError(f"plan {plan.global_step} reads chunks {missing} whose K/V are not held (held: {self._held})")

    def _rebase(self, new_base: int) -> None:
        keep = [c for c in self._held if c >= new_base]
        for c in keep:  # ascending: every move goes down, never over a chunk not yet moved
            self.pool.move(self.main_pos(c), self.region.start + (c - new_base) * self.tpc, self.tpc)
            self.moves += 1
        self._held, self.base = keep, new_base

    def commit(self, plan: StepPlan) -> None:
        """After ``plan`` ran: its ``kv_write_chunks`` are now held (written in place); chunks
        below ``kv_keep_from`` are released (unless ``keep_all``)."""
        held = set(self._held) | set(plan.kv_write_chunks)
        if not self.keep_all:
            held = {c for c in held if c >= plan.kv_keep_from}
        self._held = sorted(held)

    def shift_keys(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the held chunks' keys by ``fn(keys)`` (RoPE re-basing)."""
        for c in self._held:
            self.pool.apply(self.main_pos(c), self.tpc, fn)

    # ----- snapshot ---------------------------------------------------------------
    def export(self) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per held chunk, per-layer (k, v) CPU copies."""
        return {c: self.pool.read(self.main_pos(c), self.tpc) for c in self._held}

    def load(self, chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Hold ``chunks`` (as returned by :meth:`export`), placed from ``base`` = the oldest.

        Raises:
            ValueError: the chunks do not fit the ``main`` area.
        """
        order = sorted(chunks)
        self.base = order[0] if order and not self.keep_all else 0
        if order and order[-1] + 1 - self.base > self.areas.main:
            raise ValueError(f"chunks {order} do not fit the {self.areas.main}-chunk KV area")
        for c in order:
            self.pool.write(self.main_pos(c), chunks[c])
        self._held = order

    # ----- accounting -------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """Bytes of the clean-chunk K/V held (the ring)."""
        return len(self._held) * self.tpc * self.pool.token_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes of the job's pool region (ring + window areas)."""
        return self.region.tokens * self.pool.token_bytes
