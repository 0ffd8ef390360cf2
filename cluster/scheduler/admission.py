"""Admission of jobs to the engine: a bounded queue in front of a bounded active set, with a
replaceable policy (plain Python, no torch; tested without a model).

* a job offered with its KV demand (pool blocks) becomes active at once when fewer than
  ``max_active`` jobs run, nobody waits and its region can be allocated; otherwise it waits;
* :meth:`Admission.admit` moves waiting jobs to the active set while there is room, in the
  order the :class:`AdmissionPolicy` picks them (:class:`FifoPolicy` today: strictly
  first-in first-out, a large job at the head is not overtaken by smaller ones behind it, so
  no job starves);
* past ``queue_limit`` waiting jobs, :meth:`Admission.offer` raises :class:`QueueFull`;
* regions come from the ``blocks`` allocator (the engine's KV pool: ``alloc(n) -> region or
  None``, ``release(region)``): admission holds each active job's region and gives it back
  when the job leaves. Nothing calls back into the engine.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class QueueFull(RuntimeError):
    """The admission queue holds ``queue_limit`` jobs already (``active`` running, ``queued`` waiting)."""

    def __init__(self, queue_limit: int, active: int, queued: int):
        super().__init__(f"admission queue full: {queued} of {queue_limit} waiting, {active} running")
        self.queue_limit, self.active, self.queued = queue_limit, active, queued


class BlockAllocator(Protocol):
    """Where regions come from (:class:`stages.dit.kv_pool.KVPool` and its sharded twin)."""

    def alloc(self, blocks: int) -> Any: ...

    def release(self, region: Any) -> None: ...


@dataclass(frozen=True)
class Waiting:
    """A queued job as a policy sees it: ``key``, ``blocks`` (its KV demand), ``seq`` (offer
    order, 0-based) and ``tenant`` (None today; for per-tenant policies)."""

    key: Hashable
    blocks: int
    seq: int
    tenant: str | None = None


class AdmissionPolicy(Protocol):
    """Picks the next waiting job to try, or None to admit nothing more this round."""

    def pick(self, waiting: Sequence[Waiting]) -> Waiting | None: ...


class FifoPolicy:
    """First in, first out: always the head of the queue (if its region does not fit now,
    nothing behind it is admitted either)."""

    def pick(self, waiting: Sequence[Waiting]) -> Waiting | None:
        return waiting[0] if waiting else None


class Admission:
    """Bounded active set + bounded queue (see module docstring).

    Args:
        max_active: jobs that may run at once (>= 1).
        queue_limit: jobs that may wait (>= 0).
        blocks: the region allocator (:class:`BlockAllocator`).
        policy: which waiting job goes next (default :class:`FifoPolicy`).

    Raises:
        ValueError: a limit out of range.
    """

    def __init__(self, max_active: int, queue_limit: int, blocks: BlockAllocator, policy: AdmissionPolicy | None = None):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        if queue_limit < 0:
            raise ValueError(f"queue_limit must be >= 0, got {queue_limit}")
        self.max_active, self.queue_limit = max_active, queue_limit
        self._blocks, self.policy = blocks, policy or FifoPolicy()
        self._active: OrderedDict[Hashable, Any] = OrderedDict()
        self._regions: dict[Hashable, Any] = {}
        self._queue: OrderedDict[Hashable, tuple[Waiting, Any]] = OrderedDict()
        self._seq = 0

    @property
    def active(self) -> list:
        """Active jobs in admission order."""
        return list(self._active.values())

    @property
    def queued(self) -> list:
        """Waiting jobs, in queue order."""
        return [job for _, job in self._queue.values()]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._active or key in self._queue

    def get(self, key: Hashable) -> Any:
        if key in self._active:
            return self._active[key]
        return self._queue[key][1] if key in self._queue else None

    def region(self, key: Hashable) -> Any:
        """The region of an active job (None if not active)."""
        return self._regions.get(key)

    def position(self, key: Hashable) -> int | None:
        """0-based place in the queue (0 = first in line), None if not waiting."""
        for i, k in enumerate(self._queue):
            if k == key:
                return i
        return None

    def offer(self, key: Hashable, job: Any, blocks: int, tenant: str | None = None) -> bool:
        """Add a job needing ``blocks`` pool blocks: True if it is active now (its region
        allocated), False if it waits.

        Raises:
            ValueError: ``key`` is already queued or active.
            QueueFull: the queue is full.
        """
        if key in self:
            raise ValueError(f"job {key!r} is already queued or running")
        entry = Waiting(key, blocks, self._seq, tenant)
        if not self._queue and self._try_activate(entry, job):
            self._seq += 1
            return True
        if len(self._queue) >= self.queue_limit:
            raise QueueFull(self.queue_limit, len(self._active), len(self._queue))
        self._seq += 1
        self._queue[key] = (entry, job)
        return False

    def admit(self) -> list:
        """Move waiting jobs (policy order) to the active set while there is room; returns the
        admitted jobs in order."""
        admitted = []
        while self._queue:
            entry = self.policy.pick([w for w, _ in self._queue.values()])
            if entry is None or not self._try_activate(entry, self._queue[entry.key][1]):
                break
            admitted.append(self._queue.pop(entry.key)[1])
        return admitted

    def _try_activate(self, entry: Waiting, job: Any) -> bool:
        if len(self._active) >= self.max_active:
            return False
        region = self._blocks.alloc(entry.blocks)
        if region is None:
            return False
        self._active[entry.key], self._regions[entry.key] = job, region
        return True

    def remove(self, key: Hashable) -> Any:
        """Drop a job (finished, cancelled or failed) from wherever it is and give its region
        back; returns the job or None."""
        region = self._regions.pop(key, None)
        if region is not None:
            self._blocks.release(region)
        if key in self._active:
            return self._active.pop(key)
        return self._queue.pop(key)[1] if key in self._queue else None
