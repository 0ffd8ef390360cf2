"""Python client SDK of the ``magi.v1.VideoGeneration`` gRPC service.

Example::

    with MagiClient("127.0.0.1:9000") as client:
        stream = client.generate(make_request("a cat playing piano", num_chunks=3))
        with open("out.mp4", "wb") as f:
            for msg in stream:
                if msg.HasField("chunk"):
                    f.write(msg.chunk.data)   # parts arrive in order: append
        # stream.cancel() stops the job on the service at any time

Errors arrive as ``grpc.RpcError`` (``.code()``, ``.details()``; details name the
bad field for INVALID_ARGUMENT).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from magi.v1 import generate_pb2 as pb
from magi.v1 import generate_pb2_grpc as pb_grpc

#: Receive limit the SDK sets (the service keeps messages under 4 MB; headroom for larger configs).
MAX_RECEIVE_BYTES = 16 * 1024 * 1024

FORMATS = {"fmp4": pb.OUTPUT_FORMAT_FMP4, "raw": pb.OUTPUT_FORMAT_RAW_RGB}


def make_request(
    prompt: str,
    *,
    prompt_from: Sequence[tuple[int, str]] = (),
    image: bytes | str | Path | None = None,
    prefix_video: bytes | str | Path | None = None,
    num_chunks: int = 1,
    num_steps: int = 0,
    seed: int = 0,
    height: int = 0,
    width: int = 0,
    output_format: str = "fmp4",
) -> pb.GenerateRequest:
    """Build a ``GenerateRequest``.

    Args:
        prompt: prompt from chunk 0 on.
        prompt_from: (start_chunk, text) pairs: ``text`` replaces the prompt from that chunk on.
        image / prefix_video: encoded bytes, or a path to read them from (at most one of the two).
        num_chunks: chunks to generate; num_steps: steps per chunk (0 = model default).
        height, width: pixels (0 = model default); seed: noise seed.
        output_format: "fmp4" (fragmented MP4 segments) or "raw" (uint8 RGB frames).
    Raises:
        ValueError: both image and prefix_video given, or an unknown output_format.
    """
    if image is not None and prefix_video is not None:
        raise ValueError("give either image or prefix_video, not both")
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {sorted(FORMATS)}, got {output_format!r}")
    segments = [pb.PromptSegment(start_chunk=0, text=prompt)]
    segments += [pb.PromptSegment(start_chunk=k, text=t) for k, t in sorted(prompt_from)]
    req = pb.GenerateRequest(
        prompt_segments=segments,
        num_chunks=num_chunks,
        num_steps=num_steps,
        seed=seed,
        height=height,
        width=width,
        output_format=FORMATS[output_format],
    )
    if image is not None:
        req.image = _read(image)
    elif prefix_video is not None:
        req.prefix_video = _read(prefix_video)
    return req


def _read(data: bytes | str | Path) -> bytes:
    return data if isinstance(data, bytes) else Path(data).read_bytes()


class GenerateStream:
    """Iterator over one job's ``GenerateResponse`` messages; ``cancel()`` stops the job.

    Attributes:
        accepted: the JobAccepted message once received (job_id, sizes, fps), else None.
        done: the Done message once received (TTFC, TPOC), else None.
        first_chunk_at: client clock (``time.perf_counter``) when the first chunk arrived.
    """

    def __init__(self, call, started_at: float):
        self._call = call
        self.started_at = started_at
        self.accepted: pb.JobAccepted | None = None
        self.done: pb.Done | None = None
        self.first_chunk_at: float | None = None

    def __iter__(self) -> Iterator[pb.GenerateResponse]:
        for msg in self._call:
            kind = msg.WhichOneof("event")
            if kind == "accepted":
                self.accepted = msg.accepted
            elif kind == "chunk" and self.first_chunk_at is None:
                self.first_chunk_at = time.perf_counter()
            elif kind == "done":
                self.done = msg.done
            yield msg

    def cancel(self) -> None:
        """Cancel the call; the service stops the job's engine work."""
        self._call.cancel()

    @property
    def job_id(self) -> str | None:
        return self.accepted.job_id if self.accepted else None


class MagiClient:
    """gRPC client of a magi-serve endpoint (``host:port``, plaintext)."""

    def __init__(self, address: str, *, max_receive_bytes: int = MAX_RECEIVE_BYTES):
        self.address = address
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", max_receive_bytes)]
        )
        self._stub = pb_grpc.VideoGenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> GenerateStream:
        """Start a job; iterate the returned stream for its events (see the .proto)."""
        call = self._stub.Generate(request, timeout=timeout, metadata=tuple(metadata) or None)
        return GenerateStream(call, time.perf_counter())

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
