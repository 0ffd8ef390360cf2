"""Admission gate of the ingress for a graceful stop.

``magi serve`` on SIGTERM / Ctrl-C (:meth:`cluster.client.local.LocalService.drain`)
closes the gate: new ``Generate`` calls end with UNAVAILABLE "service is shutting
down", running ones go on; it polls the number still running until it reaches 0 or
the graceful timeout passes, then shuts Serve down. Serve's own shutdown is no
substitute in Ray 2.60: it kills the proxy first (``ProxyState.shutdown``), which
cuts every open stream.
"""

from __future__ import annotations

import functools
from typing import AsyncIterator, Callable

import grpc

from cluster.serve import errors
from magi.v1 import generate_pb2 as pb

SHUTTING_DOWN = "service is shutting down; retry later or on another endpoint"


class Gate:
    """Counts running streams; once closed, refuses new ones.

    Attributes:
        running: streams that passed the gate and have not ended.
        closed: True once :meth:`close` was called.
    """

    def __init__(self) -> None:
        self.running = 0
        self.closed = False

    def close(self) -> int:
        """Refuse new streams from now on; returns :attr:`running` (poll it again until 0)."""
        self.closed = True
        return self.running


def gated(method: Callable[..., AsyncIterator]) -> Callable[..., AsyncIterator]:
    """Decorator of a streaming gRPC method ``(self, request, grpc_context)`` of a class
    with a ``_gate`` (:class:`Gate`): while the gate is closed a call ends at once with
    UNAVAILABLE :data:`SHUTTING_DOWN` (+ request id; an event-less message carries the
    status, see :func:`cluster.serve.errors.set_status`); a call that passed is counted in
    ``_gate.running`` until it ends.
    """

    @functools.wraps(method)
    async def wrapper(self, request, grpc_context):
        gate: Gate = self._gate
        if gate.closed:
            errors.refuse(grpc_context, errors.request_id(), method.__name__, grpc.StatusCode.UNAVAILABLE,
                          SHUTTING_DOWN)
            yield pb.GenerateResponse()
            return
        gate.running += 1
        try:
            async for message in method(self, request, grpc_context):
                yield message
        finally:
            gate.running -= 1

    return wrapper
