"""Building the ``Generate`` response stream: protobuf events, chunk muxing, TTFC/TPOC clock.

Plain Python (no Ray): the pieces :class:`cluster.pipeline.Pipeline` assembles the stream from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cluster.engine.stats import ttfc_tpoc
from cluster.messages import JobSpec, OutputFormat, Progress
from cluster.scheduler.chunks import prefix_split
from magi.v1 import generate_pb2 as pb
from stages.config import ModelConfig
from stages.video import Fmp4ChunkEncoder, RawFramesEncoder

PB_FORMAT = {OutputFormat.FMP4: pb.OUTPUT_FORMAT_FMP4, OutputFormat.RAW_RGB: pb.OUTPUT_FORMAT_RAW_RGB}


def expected_frames(spec: JobSpec, model: ModelConfig) -> int:
    """Video frames the job streams: num_chunks * frames_per_chunk, less a V2V prefix's leftover.

    A prefix of P latent frames leaves P % chunk_width of them inside the first
    generated chunk; the engine cuts them from that chunk's output (reference
    ``SampleTransport.try_pad_prefix_video``; :func:`cluster.scheduler.chunks.prefix_split`).
    """
    s = model.sampling
    total = spec.num_chunks * s.frames_per_chunk
    if spec.prefix_video is not None:
        prefix_latent = len(spec.prefix_video) // s.temporal_downsample_factor
        _, leftover = prefix_split(prefix_latent, s.chunk_width)
        total -= leftover * s.temporal_downsample_factor
    return total


def accepted(spec: JobSpec, model: ModelConfig) -> pb.GenerateResponse:
    """The stream's first message."""
    return pb.GenerateResponse(
        accepted=pb.JobAccepted(
            job_id=spec.job_id,
            num_chunks=spec.num_chunks,
            num_frames=expected_frames(spec, model),
            frames_per_chunk=model.sampling.frames_per_chunk,
            fps=model.sampling.fps,
            width=spec.width,
            height=spec.height,
            num_steps=spec.num_steps,
            output_format=PB_FORMAT[spec.output_format],
        )
    )


def progress(event: Progress) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        progress=pb.Progress(chunk=event.chunk, step=event.step, num_steps=event.num_steps)
    )


def chunk_parts(
    index: int, num_frames: int, data: bytes, fmt: OutputFormat, max_bytes: int
) -> list[pb.GenerateResponse]:
    """Split one chunk payload into ``Chunk`` messages of at most ``max_bytes`` data each.

    Concatenating the parts' ``data`` in order gives ``data`` back; the last part
    has ``last_part`` set (an empty payload still yields one part).
    """
    pieces = [data[i : i + max_bytes] for i in range(0, len(data), max_bytes)] or [b""]
    return [
        pb.GenerateResponse(
            chunk=pb.Chunk(
                index=index,
                num_frames=num_frames,
                data=piece,
                format=PB_FORMAT[fmt],
                part=part,
                last_part=part == len(pieces) - 1,
            )
        )
        for part, piece in enumerate(pieces)
    ]


class ChunkMuxer:
    """Turns decoded frames into per-chunk payloads in the job's output format.

    FMP4: a :class:`stages.video.Fmp4ChunkEncoder` (each chunk an independently
    decodable fMP4 segment, chunk 0 carrying the init segment); RAW_RGB: a
    :class:`stages.video.RawFramesEncoder` (uint8 (F, H, W, 3) bytes). The encoder's
    closing bytes are appended to the last chunk. Stateful: call in chunk order.
    """

    def __init__(self, spec: JobSpec, fps: int):
        if spec.output_format is OutputFormat.FMP4:
            self._encoder = Fmp4ChunkEncoder(spec.width, spec.height, fps)
        else:
            self._encoder = RawFramesEncoder(spec.width, spec.height)

    def mux(self, frames: np.ndarray, last: bool) -> bytes:
        """Payload of one chunk from uint8 frames (F, H, W, 3)."""
        data = self._encoder.encode(frames)
        return data + self._encoder.close() if last else data


@dataclass
class StreamClock:
    """TTFC / TPOC bookkeeping for one job (seconds, ``time.perf_counter``).

    TTFC = first chunk sent - request received; TPOC = mean gap between
    consecutive chunks after the first (0 with one chunk); ``frames`` = video
    frames sent.
    """

    start: float = field(default_factory=time.perf_counter)
    chunk_times: list[float] = field(default_factory=list)
    frames: int = 0

    def chunk_sent(self, num_frames: int) -> None:
        self.chunk_times.append(time.perf_counter())
        self.frames += num_frames

    def done(self) -> pb.GenerateResponse:
        now = time.perf_counter()
        times = self.chunk_times
        ttfc, tpoc = ttfc_tpoc(self.start, times[0] if times else None, times[-1] if times else None, len(times))
        return pb.GenerateResponse(
            done=pb.Done(
                ttfc_s=ttfc or 0.0,
                tpoc_s=tpoc or 0.0,
                total_s=now - self.start,
                total_frames=self.frames,
                num_chunks=len(times),
            )
        )
