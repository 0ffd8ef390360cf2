"""Internal messages between the ingress, the stages and the engine (one module): requests
(``JobSpec``, ``EngineJob``, ``CaptionEmbedding``) and the events of a job's stream
(``QueuePosition``, ``Progress``, ``LatentChunk``) and its lifecycle in the engine
(``JobAdmitted``, ``JobFinished``). The scheduler's step plans are its own plain data
(:mod:`cluster.scheduler.plan`, :mod:`cluster.scheduler.step_plan`), read only by the engine.

Tensors travel as ``torch.Tensor`` on CPU (Ray serializes them zero-copy); the
public API is the .proto in ``proto/magi/v1``. Shapes use named dims:
C latent channels, T latent frames, H/W latent height/width, L caption tokens,
D caption channels, F video frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class OutputFormat(str, Enum):
    FMP4 = "fmp4"  # each chunk a fragmented-MP4 (H.264) segment, keyframe first
    RAW_RGB = "raw_rgb"  # each chunk raw uint8 RGB frames (F, H, W, 3)


@dataclass(frozen=True)
class PromptSegment:
    """Prompt ``text`` applies from chunk ``start_chunk`` (inclusive) on."""

    start_chunk: int
    text: str


@dataclass(frozen=True)
class JobSpec:
    """A validated generation request.

    Attributes:
        job_id: unique id (hex string).
        prompt_segments: sorted by start_chunk, the first starts at 0.
        num_chunks: chunks to generate (each ``frames_per_chunk`` video frames).
        height, width: video size in pixels.
        seed: noise seed; chunk c's noise comes from a generator seeded by (seed, c).
        num_steps: denoising steps per chunk.
        output_format: see :class:`OutputFormat`.
        image: I2V conditioning image, uint8 (H, W, 3) numpy array already resized
            to (height, width), or None.
        prefix_video: V2V prefix, uint8 (F, H, W, 3) numpy array, or None.
    """

    job_id: str
    prompt_segments: tuple[PromptSegment, ...]
    num_chunks: int
    height: int
    width: int
    seed: int
    num_steps: int
    output_format: OutputFormat = OutputFormat.FMP4
    image: Any = None
    prefix_video: Any = None


@dataclass(frozen=True)
class CaptionEmbedding:
    """T5 output for one prompt: ``embedding`` float32 (L, D), ``mask`` int64 (L,), 1 = valid."""

    embedding: Any
    mask: Any


@dataclass(frozen=True)
class EngineJob:
    """Everything the DiT engine needs to run one job.

    Attributes:
        spec: the request.
        captions: one (start_chunk, CaptionEmbedding) per prompt segment.
        prefix_latent: scaled VAE latent of the conditioning image / prefix video,
            float32 (C, T_prefix, H, W), or None for T2V.
    """

    spec: JobSpec
    captions: tuple[tuple[int, CaptionEmbedding], ...]
    prefix_latent: Any = None


@dataclass(frozen=True)
class Progress:
    """Engine progress: ``chunk`` is the oldest chunk in flight, ``step`` its step index."""

    job_id: str
    chunk: int
    step: int
    num_steps: int


@dataclass(frozen=True)
class LatentChunk:
    """A clean latent chunk, float32 (C, T, H, W), index relative to the first generated chunk."""

    job_id: str
    index: int
    latent: Any
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QueuePosition:
    """The job waits for admission to the engine: ``position`` jobs are ahead of it in the
    admission queue (0 = admitted next). Sent when the job is queued and whenever its position
    changes, until it starts (before its first ``Progress``)."""

    job_id: str
    position: int


@dataclass(frozen=True)
class JobAdmitted:
    """A queued or newly submitted job got its KV region; it runs from this step on.
    ``queued_s``: seconds it waited (0 when admitted at submit)."""

    job_id: str
    queued_s: float


@dataclass(frozen=True)
class JobFinished:
    """A job left the engine: ``state`` "done" (last chunk emitted), "cancelled" or "failed"
    (``error`` says why); ``chunks``: chunks it emitted. Its KV region is back in the pool."""

    job_id: str
    state: str
    chunks: int
    error: str | None = None


@dataclass(frozen=True)
class Refusal:
    """A refused request crossing a deployment boundary as a value, not a raised error (so the
    refusing replica logs one line, not a traceback at ERROR): the last event of
    ``DiTEngine.run``, or what ``DiTEngine.update_prompt`` returns. The caller re-raises
    ``error`` (:meth:`raise_error`).

    Attributes:
        error: the picklable refusal: ``stages.errors.InvalidInput``, ``cluster.engine.EngineBusy``,
            ``cluster.engine.JobNotFound`` or ``cluster.engine.JobCancelled``.
    """

    error: Exception

    def raise_error(self):
        raise self.error
