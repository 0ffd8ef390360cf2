"""Admission of jobs to the engine: a bounded FIFO queue in front of a bounded active set.

Plain Python (no torch), so it is tested without a model. Policy:

* a submitted job becomes active at once when fewer than ``max_active`` jobs run, nobody is
  queued before it, and its resources (KV-pool region) can be allocated; otherwise it waits;
* waiting jobs are admitted strictly first-in first-out (a large job at the head is not
  overtaken by smaller ones behind it, so no job starves: every job ahead of it is either
  active, and finishes or is cancelled, or ahead of it in the same queue);
* past ``queue_limit`` waiting jobs, :meth:`Admission.offer` raises
  :class:`cluster.engine.errors.EngineBusy` (RESOURCE_EXHAUSTED);
* active jobs all advance one step per engine step (the engine's fairness rule), so the
  wait of the queue head is bounded by the remaining steps of the active job closest to
  finishing (an endless stream holds its place until cancelled).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from cluster.engine.errors import EngineBusy


class Admission:
    """Bounded active set + bounded FIFO queue (see module docstring).

    Args:
        max_active: jobs that may run at once (>= 1).
        queue_limit: jobs that may wait (>= 0).
        allocate: ``allocate(job) -> bool`` reserves a job's resources (False: not now).
        retry_hint: ``retry_hint() -> seconds`` for :class:`EngineBusy`.

    Raises:
        ValueError: a limit out of range.
    """

    def __init__(self, max_active: int, queue_limit: int, allocate: Callable[[Any], bool],
                 retry_hint: Callable[[], float] = lambda: 1.0):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        if queue_limit < 0:
            raise ValueError(f"queue_limit must be >= 0, got {queue_limit}")
        self.max_active, self.queue_limit = max_active, queue_limit
        self._allocate, self._retry_hint = allocate, retry_hint
        self._active: OrderedDict[Hashable, Any] = OrderedDict()
        self._queue: OrderedDict[Hashable, Any] = OrderedDict()

    @property
    def active(self) -> list:
        """Active jobs in admission order."""
        return list(self._active.values())

    @property
    def queued(self) -> list:
        """Waiting jobs, head first."""
        return list(self._queue.values())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._active or key in self._queue

    def get(self, key: Hashable) -> Any:
        return self._active.get(key, self._queue.get(key))

    def position(self, key: Hashable) -> int | None:
        """0-based place in the queue (0 = admitted next), None if not waiting."""
        for i, k in enumerate(self._queue):
            if k == key:
                return i
        return None

    def offer(self, key: Hashable, job: Any) -> bool:
        """Add a job: True if it is active now, False if it waits.

        Raises:
            ValueError: ``key`` is already queued or active.
            EngineBusy: the queue is full.
        """
        if key in self:
            raise ValueError(f"job {key!r} is already queued or running")
        if not self._queue and len(self._active) < self.max_active and self._allocate(job):
            self._active[key] = job
            return True
        if len(self._queue) >= self.queue_limit:
            raise EngineBusy(queue_limit=self.queue_limit, active=len(self._active), queued=len(self._queue),
                             retry_after_s=self._retry_hint())
        self._queue[key] = job
        return False

    def admit(self) -> list:
        """Move queue heads to the active set while there is room; returns the admitted jobs."""
        admitted = []
        while self._queue and len(self._active) < self.max_active:
            key, job = next(iter(self._queue.items()))
            if not self._allocate(job):
                break
            del self._queue[key]
            self._active[key] = job
            admitted.append(job)
        return admitted

    def remove(self, key: Hashable) -> Any:
        """Drop a job (finished, cancelled or failed) from wherever it is; returns it or None.
        The caller releases its resources."""
        return self._active.pop(key, None) or self._queue.pop(key, None)
