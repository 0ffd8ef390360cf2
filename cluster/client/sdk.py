"""Python client SDK of the ``magi.v1.VideoGeneration`` gRPC service.

Example::

    with MagiClient("127.0.0.1:9000") as client:
        with client.generate(make_request("a cat playing piano", num_chunks=3)) as stream, \
                open("out.mp4", "wb") as f:
            for msg in stream:
                if msg.HasField("chunk"):
                    f.write(msg.chunk.data)   # parts arrive in order: append
        # stream.cancel() (or leaving the with block early) stops the job on the service

Errors arrive as ``grpc.RpcError`` (``.code()``, ``.details()``; details name the
bad field for INVALID_ARGUMENT).

Retries: a full service refuses a job with RESOURCE_EXHAUSTED, a delay in words and
``google.rpc.RetryInfo`` in the status details (see :mod:`cluster.serve.retry`). A client
made with ``retry=RetryPolicy()`` waits that delay and submits the job again (same
job_id: a refused job never started), up to ``max_attempts`` calls; the stream's
messages then continue as if the job had been accepted at once (one JobAccepted).

Cancellation: every job gets a client-chosen random id (``GenerateRequest.job_id``), and
a stream left before its end (``cancel()``, ``close()``, leaving a ``with`` block, a
deadline, a broken connection) also sends ``Cancel(job_id)``: cancelling the gRPC call
alone does not always reach the service through Ray Serve's gRPC proxy (see
:mod:`cluster.serve.cancels`).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from cluster.client.request import FORMATS, make_request  # noqa: F401  (part of the SDK's API)
from magi.v1 import generate_pb2 as pb
from magi.v1 import generate_pb2_grpc as pb_grpc

#: Receive limit the SDK sets (the service keeps messages under 4 MB; headroom for larger configs).
MAX_RECEIVE_BYTES = 16 * 1024 * 1024

#: Statuses that end a stream from the client's side or the transport's, not by the service's
#: decision: the job may still run on the service, so the SDK sends Cancel(job_id).
CLIENT_SIDE_ENDS = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN})

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Resubmit a job refused with RESOURCE_EXHAUSTED + ``google.rpc.RetryInfo`` after the delay.

    Attributes:
        max_attempts: Generate calls per job at most (the first one included).
        max_delay_s: longest wait honoured (seconds); a longer RetryInfo is cut to it.
    """

    max_attempts: int = 10
    max_delay_s: float = 300.0


def retry_delay(error: grpc.RpcError) -> float | None:
    """Seconds of the ``google.rpc.RetryInfo`` in a failed call's status details, else None."""
    try:
        status = rpc_status.from_call(error)
    except (AttributeError, ValueError):  # not a call, or details that contradict the code
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


class GenerateStream:
    """Iterator over one job's ``GenerateResponse`` messages; ``cancel()`` stops the job.

    Leave a stream before its end with :meth:`cancel` or :meth:`close`, or iterate it in a
    ``with`` block (leaving the block closes it): each sends ``Cancel(job_id)``. A stream that
    ends by a deadline or a broken connection sends it too (errors logged, not raised).
    Merely dropping the stream (or breaking out of a loop outside a ``with`` block) only
    cancels the gRPC call, which Serve's gRPC proxy may not pass on.

    With a :class:`RetryPolicy` a refused job is resubmitted after the service's RetryInfo
    delay; the stream goes on with the new call's messages (its JobAccepted is not repeated).

    Attributes:
        job_id: the job's id (chosen by the client, known before JobAccepted).
        attempts: Generate calls made for the job so far (1 without retries).
        accepted: the JobAccepted message once received (job_id, sizes, fps), else None.
        done: the Done message once received (TTFC, TPOC), else None.
        first_chunk_at: client clock (``time.perf_counter``) when the first chunk arrived.
    """

    def __init__(self, call, job_id: str, cancel_job, started_at: float,
                 resubmit: Callable[[], object] | None = None, retry: RetryPolicy | None = None):
        self._call = call
        self._cancel_job = cancel_job  # MagiClient.cancel
        self._resubmit, self._retry = resubmit, retry  # a new call of the same request
        self.attempts = 1
        self._over = False  # ended by the service (Done or its error status), or cancelled
        self.job_id = job_id
        self.started_at = started_at
        self.accepted: pb.JobAccepted | None = None
        self.done: pb.Done | None = None
        self.first_chunk_at: float | None = None

    def __iter__(self) -> Iterator[pb.GenerateResponse]:
        while True:
            try:
                yield from self._messages()
                self._over = True
                return
            except grpc.RpcError as exc:
                delay = self._retry_after(exc)
                if delay is None:
                    if exc.code() in CLIENT_SIDE_ENDS:  # the job may still run on the service
                        self.close()  # a no-op after cancel()
                    self._over = True
                    raise
            _log.info("job %s refused (service full); attempt %d in %.1f s", self.job_id, self.attempts + 1, delay)
            time.sleep(delay)
            if self._over:  # cancelled while waiting
                return
            self._call, self.attempts = self._resubmit(), self.attempts + 1

    def _messages(self) -> Iterator[pb.GenerateResponse]:
        for msg in self._call:
            kind = msg.WhichOneof("event")
            if kind is None:  # carries only a refusal's trailer (cluster.serve.retry)
                continue
            if kind == "accepted":
                if self.accepted is not None:  # a resubmitted job is accepted again
                    continue
                self.accepted = msg.accepted
            elif kind == "chunk" and self.first_chunk_at is None:
                self.first_chunk_at = time.perf_counter()
            elif kind == "done":
                self.done, self._over = msg.done, True
            yield msg

    def _retry_after(self, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before resubmitting, or None: no retry (no policy, other code, no
        RetryInfo, attempts used up, cancelled)."""
        if (self._retry is None or self._over or exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
                or self.attempts >= self._retry.max_attempts):
            return None
        delay = retry_delay(exc)
        return None if delay is None else min(delay, self._retry.max_delay_s)

    def cancel(self, timeout: float = 10.0) -> bool:
        """Stop the job: cancel the call, then ``Cancel(job_id)`` on the service.

        Returns:
            ``CancelResponse.was_active``: True when the engine held the job and stopped it;
            False when it does not hold it (finished, or not arrived yet: then it is refused
            on arrival), or when this stream had already ended or been cancelled.
        Raises:
            grpc.RpcError: the Cancel call failed (the job may still run; retry
                ``MagiClient.cancel(job_id)``).
        """
        self._call.cancel()
        if self._over:
            return False
        self._over = True
        return self._cancel_job(self.job_id, timeout=timeout)

    def close(self) -> None:
        """Abandon the stream: as :meth:`cancel`, but a failed Cancel is logged, not raised."""
        try:
            self.cancel()
        except grpc.RpcError as exc:
            _log.warning("could not cancel job %s on the service: %s %s", self.job_id, exc.code(), exc.details())

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MagiClient:
    """gRPC client of a magi-serve endpoint (``host:port``, plaintext)."""

    def __init__(self, address: str, *, max_receive_bytes: int = MAX_RECEIVE_BYTES,
                 retry: RetryPolicy | None = None):
        self.address = address
        self.retry = retry  # None: a refused job raises RESOURCE_EXHAUSTED at once
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", max_receive_bytes)]
        )
        self._stub = pb_grpc.VideoGenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> GenerateStream:
        """Start a job; iterate the returned stream for its events (see the .proto).

        A request without ``job_id`` is sent (as a copy) with a random one (UUID4 hex), so
        the job can be cancelled by id at any time, even before JobAccepted. With the
        client's :class:`RetryPolicy` a refused job is resubmitted (``timeout`` applies per call).
        """
        sent = pb.GenerateRequest()
        sent.CopyFrom(request)
        sent.job_id = sent.job_id or uuid.uuid4().hex

        def submit():
            return self._stub.Generate(sent, timeout=timeout, metadata=tuple(metadata) or None)

        return GenerateStream(submit(), sent.job_id, self.cancel, time.perf_counter(), submit, self.retry)

    def cancel(self, job_id: str, *, timeout: float | None = 10.0) -> bool:
        """``Cancel``: stop a job by id (idempotent). A job not on the service yet is refused when
        it arrives (within 10 minutes).

        Returns:
            True when the engine held the job (queued or running) and stopped it.
        Raises:
            grpc.RpcError: INVALID_ARGUMENT ("job_id: ..."), or the call failed.
        """
        return self._stub.Cancel(pb.CancelRequest(job_id=job_id), timeout=timeout).was_active

    def update_prompt(self, job_id: str, start_chunk: int, text: str, *, timeout: float | None = 30.0
                      ) -> pb.UpdatePromptResponse:
        """Change a running job's prompt from generated chunk ``start_chunk`` on (UpdatePrompt).

        ``start_chunk`` must not have started denoising yet (pick one a few chunks ahead of the
        last chunk received). Chunks before it are unchanged.

        Raises:
            grpc.RpcError: NOT_FOUND (no such running job), INVALID_ARGUMENT (details start with
                the field: "start_chunk: ...", "text: ...").
        """
        return self._stub.UpdatePrompt(
            pb.UpdatePromptRequest(job_id=job_id, start_chunk=start_chunk, text=text), timeout=timeout)

    def health(self, service: str = "", timeout: float = 10.0) -> str:
        """grpc.health.v1 Check; returns the status name (e.g. "SERVING").

        Raises:
            grpc.RpcError: the endpoint is unreachable or does not know ``service``.
        """
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll health until SERVING.

        Raises:
            TimeoutError: not SERVING within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=5.0) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f} s")
            time.sleep(0.5)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MagiClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
