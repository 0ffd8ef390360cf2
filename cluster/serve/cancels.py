"""Job cancellation that never depends on a stream cancel getting through (Ray Serve's gRPC proxy).

Why: a client that cancels its ``Generate`` call relies on Serve's gRPC proxy to cancel the
ingress request. In Ray 2.60 (grpcio 1.85) that is lost whenever the cancellation reaches
the proxy while it writes a response message: grpc-aio injects ``CancelledError`` into the
pending write, never closes the proxy's response generator (grpc/grpc#42295), and Serve's
``gRPCProxy.send_request_to_replica`` only cancels the replica request when the cancel lands
inside its own ``await`` on the replica. The ingress request (and the engine job) then runs to
its end. So the API has an explicit ``Cancel(job_id)`` RPC (the SDK calls it on every
abandoned stream), and a cancel may name a job the DiT engine does not hold yet.

The rule: a job is cancelled only by an explicit signal (its DiT stream cancelled or closed
by the ingress, or ``Cancel``); a slow consumer is never cancelled for being slow.
"""

from __future__ import annotations

import collections
import re
import time

from stages.errors import InvalidInput

#: Seconds a cancel for a job the engine does not hold yet is remembered.
CANCEL_MEMORY_S = 600.0
#: Most remembered early cancels per DiT engine replica (oldest forgotten first).
MAX_EARLY_CANCELS = 4096
#: Characters of a job id (client-chosen or service-chosen) and its length bound.
JOB_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class JobCancelled(RuntimeError):
    """Raised by ``DiTEngine.run`` when its job was cancelled by ``DiTEngine.cancel`` (picklable).

    Attributes:
        job_id: the cancelled job.
    """

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id} was cancelled"


def check_job_id(value: str, field: str = "job_id") -> str:
    """``value`` if it is a valid job id (1 to 64 characters of [A-Za-z0-9._-]).

    Raises:
        InvalidInput: naming ``field`` (empty, too long, or a character outside the set).
    """
    if not value:
        raise InvalidInput(field, "empty")
    if not JOB_ID_RE.fullmatch(value):
        raise InvalidInput(field, f"must be 1 to 64 characters of [A-Za-z0-9._-], got {value[:80]!r}")
    return value


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
