"""The "engine full" answer: RESOURCE_EXHAUSTED, a retry delay in words and as ``google.rpc.RetryInfo``.

A refused client is told when to come back. Telling every refused client the same
delay (the engine's estimate of when its next job finishes) brings them all back at
once, and all but a few are refused again: a retry storm. :class:`RetryPacer` gives
each refused client its own place instead (:func:`spread_delay`): the n-th client still
waiting for its retry comes back ``n`` admission intervals after the first, at a random
point of its interval, so the retries arrive about as fast as the engine frees room.

The delay travels twice: in the details ("... retry in about N s", for people) and as
``google.rpc.RetryInfo`` in the ``google.rpc.Status`` details (trailer
``grpc-status-details-bin``, built with grpcio-status), which the SDK honours
(:class:`cluster.client.sdk.RetryPolicy`). Ray Serve 2.60's gRPC proxy forwards only the
code and details of a handler that raises; trailing metadata reaches the client only
when it was set before a message the handler yields (the proxy copies the handler's
context onto the call at each message). :func:`refusal` therefore returns a message
without an event for the ingress to yield before it raises; clients skip it.
"""

from __future__ import annotations

import random
import re
import time
from typing import Callable

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from magi.v1 import generate_pb2 as pb

_HINT = re.compile(r";? *retry in about [0-9.]+ s$")

#: Trailer that carries the serialized ``google.rpc.Status`` (the gRPC convention).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def spread_delay(retry_after_s: float, place: int, slots: int, rng: random.Random, jitter: float = 1.0) -> float:
    """Delay (seconds) for the client at ``place`` (0 = first) among those waiting to retry.

    ``retry_after_s`` (the engine's estimate until its next job finishes,
    :attr:`cluster.engine.EngineBusy.retry_after_s`) is taken as the time in which the
    engine frees ``slots`` places, one every ``retry_after_s / slots``. The client at
    ``place`` gets its own interval of that length after the first ``retry_after_s``, at a
    uniform random point of it (``jitter`` = 1; 0 = its start)::

        delay = retry_after_s * (1 + (place + jitter * U[0, 1)) / slots)

    so the retries of many refused clients arrive at about the rate places free up,
    never more than one per interval.

    Raises:
        ValueError: ``slots`` < 1, ``place`` < 0 or ``jitter`` outside [0, 1].
    """
    if slots < 1 or place < 0 or not 0 <= jitter <= 1:
        raise ValueError(f"need slots >= 1, place >= 0, 0 <= jitter <= 1; got {slots}, {place}, {jitter}")
    interval = max(retry_after_s, 0.1) / slots
    return max(retry_after_s, 0.1) + interval * (place + jitter * rng.random())


class RetryPacer:
    """Hands out retry delays that spread the refused clients (plain Python; one event loop).

    Args:
        slots: jobs the engine admits at once (``engine.max_active_jobs``).
        jitter: spread of a delay within its client's interval (see :func:`spread_delay`).
        margin: the engine's estimate is stretched by ``1 + margin``: it assumes steady step
            times, and a client that comes back early costs an attempt (and its place), one
            that comes back late costs nothing while the engine still has queued jobs.
        seed: random seed (None = from the OS).
        clock: monotonic clock (seconds).
    """

    def __init__(self, slots: int, jitter: float = 1.0, margin: float = 0.2, seed: int | None = None,
                 clock=time.monotonic):
        self._slots, self._jitter, self._stretch = slots, jitter, 1.0 + margin
        self._rng = random.Random(seed)
        self._clock = clock
        self._promised: list[float] = []  # retry times handed out (clock seconds)

    def delay(self, retry_after_s: float) -> float:
        """Delay (seconds) for the next refused client; its place counts the clients told to
        retry later than now, and it counts itself as waiting until its own retry time."""
        now = self._clock()
        self._promised = [t for t in self._promised if t > now]
        delay = spread_delay(retry_after_s * self._stretch, len(self._promised), self._slots, self._rng, self._jitter)
        self._promised.append(now + delay)
        return delay

    def refuse(self, grpc_context, full: Exception, dress: Callable[[str], str] = str) -> pb.GenerateResponse:
        """:func:`refusal` of an engine-full error (``str(full)`` in words, ``full.retry_after_s``)
        with this pacer's delay; the engine's own "; retry in about N s" is replaced.
        ``dress``: the final form of the details (e.g. with the request id appended)."""
        reason = _HINT.sub("", str(full))
        return refusal(grpc_context, reason, self.delay(full.retry_after_s), dress)


def status_with_retry(message: str, delay_s: float) -> status_pb2.Status:
    """``google.rpc.Status`` RESOURCE_EXHAUSTED whose details hold ``RetryInfo(retry_delay=delay_s)``."""
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(round(delay_s * 1e9))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    status.details.add().Pack(info)
    return status


def refusal(grpc_context, reason: str, delay_s: float, dress: Callable[[str], str] = str) -> pb.GenerateResponse:
    """Set RESOURCE_EXHAUSTED with the retry hint on ``grpc_context``; return the message to yield.

    ``reason`` is the refusal in words (e.g. "DiT engine at capacity: 2 jobs running"); the
    details become ``dress("<reason>; retry in about N s")``, and the ``google.rpc.Status``
    carries the same message (grpcio-status checks that they agree). The caller yields the
    returned event-less message (Serve's proxy passes the trailer on with it) and ends the call.
    """
    details = dress(f"{reason}; retry in about {delay_s:.1f} s")
    status = rpc_status.to_status(status_with_retry(details, delay_s))
    grpc_context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
    grpc_context.set_details(details)
    grpc_context.set_trailing_metadata(list(status.trailing_metadata))
    return pb.GenerateResponse()

