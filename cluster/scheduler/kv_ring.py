"""One job's KV bookkeeping in chunk units: ring base, held chunks, area slots, RoPE base (plain Python).

A job's KV-pool region is cut into areas of whole chunks (sizes: :mod:`cluster.scheduler.kv_areas`);
a *slot* is a chunk position counted from the region's start. The engine turns slots into
token positions and moves the tensors (:class:`cluster.engine.kv_layout.JobKV`); this module
decides where everything is.

* ``history``: ``[ring | window]`` of the history branch (:func:`stages.sampling.history_branch`:
  the branch whose K/V are kept). Global chunk ``c`` sits at slot ``c - base``, clean ring
  chunks and window chunks alike, so the keys of any window chunk (``kv_range`` = consecutive
  chunks ending at itself) are ONE slice and are read in place. A clean chunk's K/V are written
  by its clean re-forward straight into its final slot: keeping them is bookkeeping, not a
  copy. When the window would run past the area, ``base`` moves up to the plan's
  ``kv_keep_from`` and the held ring chunks (at most ``max(noise2clean_kvrange) - 1``) move
  down once (:class:`KVMove`, executed by the engine before the forward).
* ``text``: the window of ``cond_prev_text`` (cfg 3, W + 1 chunks); its keys are [ring part in
  ``history``] + [its own window part], two ranges.
* ``uncond``: the ``uncond`` branch's chunks (cfg 3, W chunks), each attends to itself.
* ``self_only``: the self-only copy of the distillation blend (cfg 1, 1 chunk).

The ring holds the clean chunks [``kv_keep_from``, first window chunk) that later plans still
read (DESIGN.md section 3): memory per job is constant in the video length. ``keep_all`` keeps
every chunk instead (the reference's whole-video cache; exactness and memory baseline):
``history`` then spans the whole job and ``base`` stays 0.

RoPE base (streams longer than the training horizon). The reference uses absolute time
positions. Positions here are relative to ``rope_base`` (a global chunk, initially 0: a job
within ``horizon`` chunks gets exactly the reference's positions). When a window would end
more than ``horizon`` chunks past the base, the base jumps to the plan's ``kv_keep_from`` and
the held chunks' keys are rotated back by the jump (the engine applies
:meth:`stages.dit.model.MagiDiT.rope_shift`; RoPE composes, so every query/key pair keeps its
position difference). Departure beyond the horizon: float32 rounding of the rotated keys
(about 1e-7 relative). ``horizon`` None = absolute positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.scheduler.kv_areas import KVAreas
from cluster.scheduler.plan import StepPlan


@dataclass(frozen=True)
class KVMove:
    """Copy one chunk's K/V from slot ``src`` to slot ``dst`` of the job's region."""

    src: int
    dst: int


class KVRing:
    """Where one job's chunks' K/V are and which it holds (module docstring).

    Args:
        areas: the region's layout in chunks; keep_all: never drop or move chunks.
    """

    def __init__(self, areas: KVAreas, keep_all: bool = False):
        self.areas, self.keep_all = areas, keep_all
        self.base = 0
        self.held: list[int] = []  # clean chunks whose K/V the job holds, ascending
        self.rope_base = 0
        self.moves = 0  # chunk copies made by re-basing (diagnostics)

    # ----- slots -------------------------------------------------------------------
    def history_slot(self, chunk: int) -> int:
        return chunk - self.base

    def text_slot(self, i: int) -> int:
        return self.areas.history + i

    def uncond_slot(self, i: int) -> int:
        return self.areas.history + self.areas.text + i

    def self_only_slot(self) -> int:
        return self.areas.history + self.areas.text + self.areas.uncond

    def history_ranges(self, kv_range: tuple[int, int]) -> list[tuple[int, int]]:
        """Slots [lo, hi) of the keys ``kv_range`` (global chunks) in the history branch: one slice."""
        lo, hi = kv_range
        return [(self.history_slot(lo), self.history_slot(hi))]

    def text_ranges(self, kv_range: tuple[int, int], first: int) -> list[tuple[int, int]]:
        """Slot ranges of ``kv_range`` in ``cond_prev_text`` (cfg 3) whose window starts at chunk
        ``first``: ring chunks from ``history``, window chunks from ``text``."""
        lo, hi = kv_range
        out = []
        if lo < min(hi, first):
            out.append((self.history_slot(lo), self.history_slot(min(hi, first))))
        if max(lo, first) < hi:
            out.append((self.text_slot(max(lo, first) - first), self.text_slot(hi - first)))
        return out

    # ----- per step ----------------------------------------------------------------
    def prepare(self, plan: StepPlan) -> tuple[KVMove, ...]:
        """Make room for ``plan``'s window in ``history`` (re-basing if needed) and check that
        every cached chunk it reads is held. Returns the moves the engine must make first.

        Raises:
            RuntimeError: a read chunk is not held, or the window cannot fit (a bug).
        """
        first, end = plan.slots[0].chunk, plan.slots[-1].chunk + 1
        moves: tuple[KVMove, ...] = ()
        if first < self.base or end - self.base > self.areas.history:
            if self.keep_all:
                raise RuntimeError(f"keep_all KV area of {self.areas.history} chunks cannot hold chunk {end - 1}")
            moves = self._rebase(plan.kv_keep_from)
            if end - self.base > self.areas.history:
                raise RuntimeError(f"window [{first}, {end}) does not fit the {self.areas.history}-chunk KV area")
        missing = sorted({c for s in plan.slots for c in range(s.kv_range[0], min(s.kv_range[1], first))} - set(self.held))
        if missing:
            raise RuntimeError(f"plan {plan.global_step} reads chunks {missing} whose K/V are not held (held: {self.held})")
        return moves

    def _rebase(self, new_base: int) -> tuple[KVMove, ...]:
        keep = [c for c in self.held if c >= new_base]
        # ascending: every move goes down, never over a chunk not yet moved
        moves = tuple(KVMove(self.history_slot(c), c - new_base) for c in keep)
        self.moves += len(moves)
        self.held, self.base = keep, new_base
        return moves

    def rope_jump(self, plan: StepPlan, horizon: int | None) -> int:
        """Chunks the RoPE base jumps before ``plan`` runs (0: none); moves ``rope_base``.
        The held chunks' keys must then be rotated back by the jump (module docstring)."""
        if horizon is None or plan.slots[-1].chunk + 1 - self.rope_base <= horizon:
            return 0
        jump = plan.kv_keep_from - self.rope_base
        if jump <= 0:
            return 0
        self.rope_base = plan.kv_keep_from
        return jump

    def commit(self, plan: StepPlan) -> None:
        """After ``plan`` ran: its ``kv_write_chunks`` are now held (written in place); chunks
        below ``kv_keep_from`` are released (unless ``keep_all``)."""
        held = set(self.held) | set(plan.kv_write_chunks)
        if not self.keep_all:
            held = {c for c in held if c >= plan.kv_keep_from}
        self.held = sorted(held)

    def load(self, chunks: list[int]) -> None:
        """Hold ``chunks`` (a snapshot's), placed from ``base`` = the oldest.

        Raises:
            ValueError: the chunks do not fit the ``history`` area.
        """
        order = sorted(chunks)
        self.base = order[0] if order and not self.keep_all else 0
        if order and order[-1] + 1 - self.base > self.areas.history:
            raise ValueError(f"chunks {order} do not fit the {self.areas.history}-chunk KV area")
        self.held = order
