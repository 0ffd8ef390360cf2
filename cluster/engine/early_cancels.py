"""Cancels of jobs the engine does not hold yet (plain Python).

A ``Cancel(job_id)`` may overtake its job: the client chose the id and the ``Generate`` call is
still being validated or encoded when the cancel reaches the engine (see
:mod:`cluster.serve.cancels` for why the API has an explicit cancel). The async engine
(:class:`cluster.engine.async_engine.AsyncEngine`) remembers such ids and refuses the job when
it arrives.
"""

from __future__ import annotations

import collections
import time

#: Seconds a cancel for a job the engine does not hold yet is remembered.
CANCEL_MEMORY_S = 600.0
#: Most remembered early cancels per engine (oldest forgotten first).
MAX_EARLY_CANCELS = 4096


class EarlyCancels:
    """Cancels of jobs not (yet) in the engine, remembered for ``memory_s`` seconds.

    ``add`` records a job id; ``consume`` tells (once) whether a live record exists. At most
    ``capacity`` ids are kept (the oldest are dropped first).

    Args:
        memory_s: seconds a record lives (``time.monotonic`` clock).
        capacity: most records kept.
    """

    def __init__(self, memory_s: float = CANCEL_MEMORY_S, capacity: int = MAX_EARLY_CANCELS):
        self._memory_s = memory_s
        self._capacity = capacity
        self._expiry: collections.OrderedDict[str, float] = collections.OrderedDict()

    def add(self, job_id: str) -> None:
        now = time.monotonic()
        self._expiry.pop(job_id, None)
        self._expiry[job_id] = now + self._memory_s
        self._prune(now)

    def consume(self, job_id: str) -> bool:
        """True (and the record is dropped) if ``job_id`` was cancelled ahead and not expired."""
        expiry = self._expiry.pop(job_id, None)
        return expiry is not None and expiry > time.monotonic()

    def __len__(self) -> int:
        self._prune(time.monotonic())
        return len(self._expiry)

    def _prune(self, now: float) -> None:
        while self._expiry and (len(self._expiry) > self._capacity or next(iter(self._expiry.values())) <= now):
            self._expiry.popitem(last=False)
