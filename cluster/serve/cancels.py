"""Job cancellation that never depends on a stream cancel getting through (Ray Serve's gRPC proxy).

Why: a client that cancels its ``Generate`` call relies on Serve's gRPC proxy to cancel the
ingress request. In Ray 2.60 (grpcio 1.85) that is lost whenever the cancellation reaches
the proxy while it writes a response message: grpc-aio injects ``CancelledError`` into the
pending write, never closes the proxy's response generator (grpc/grpc#42295), and Serve's
``gRPCProxy.send_request_to_replica`` only cancels the replica request when the cancel lands
inside its own ``await`` on the replica. The ingress request (and the engine job) then runs to
its end. So the API has an explicit ``Cancel(job_id)`` RPC (the SDK calls it on every
abandoned stream), and a cancel may name a job the DiT engine does not hold yet.

The engine side (Ray-free) is :class:`cluster.engine.async_engine.AsyncEngine`: ``cancel``
ends the job's stream with :class:`cluster.engine.JobCancelled`, and a cancel that overtakes
its job is remembered (:class:`cluster.engine.early_cancels.EarlyCancels`). This module keeps
the job-id rule shared by ``Generate`` and ``Cancel``.

The rule: a job is cancelled only by an explicit signal (its DiT stream cancelled or closed
by the ingress, or ``Cancel``); a slow consumer is never cancelled for being slow.
"""

from __future__ import annotations

import re

from stages.errors import InvalidInput

#: Characters of a job id (client-chosen or service-chosen) and its length bound.
JOB_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


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
