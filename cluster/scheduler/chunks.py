"""Chunk / frame arithmetic of the MAGI-1 chunk pipeline (plain Python).

Units: *video frames* (pixels, 24 fps), *latent frames* (the VAE compresses
``temporal_downsample_factor`` = 4 video frames into one), *chunks*
(``chunk_width`` latent frames, 6 -> 24 video frames). Conditioning
(DESIGN.md section 3): I2V = the image encoded as 1 latent frame written into
frame 0 of chunk 0; V2V = a prefix of P latent frames = P // chunk_width whole
prefix chunks (clean, KV only, never emitted) plus P % chunk_width leftover
frames written into the first noisy chunk (reference ``extract_feature_for_inference``,
``SampleTransport.try_pad_prefix_video``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.errors import InvalidInput

I2V_PREFIX_LATENT_FRAMES = 1  # an image encodes to one latent frame


def _positive(field: str, value: int, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        raise InvalidInput(field, f"must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return value


def video_frames(num_chunks: int, chunk_width: int, temporal_downsample_factor: int = 4) -> int:
    """Video frames of ``num_chunks`` chunks: num_chunks * chunk_width * temporal_downsample_factor.

    Raises:
        InvalidInput: a negative count or a non-positive width/factor (naming the argument).
    """
    _positive("num_chunks", num_chunks, allow_zero=True)
    _positive("chunk_width", chunk_width)
    _positive("temporal_downsample_factor", temporal_downsample_factor)
    return num_chunks * chunk_width * temporal_downsample_factor


def latent_frames(num_video_frames: int, temporal_downsample_factor: int = 4, *, field: str = "num_frames") -> int:
    """Latent frames of a clip of ``num_video_frames`` frames (num_video_frames / factor).

    Raises:
        InvalidInput(field): not a non-negative multiple of ``temporal_downsample_factor``.
    """
    _positive("temporal_downsample_factor", temporal_downsample_factor)
    _positive(field, num_video_frames, allow_zero=True)
    if num_video_frames % temporal_downsample_factor:
        raise InvalidInput(
            field, f"{num_video_frames} frames is not a multiple of {temporal_downsample_factor} (one latent frame)"
        )
    return num_video_frames // temporal_downsample_factor


def prefix_split(prefix_latent_frames: int, chunk_width: int) -> tuple[int, int]:
    """Split a conditioning prefix into (whole_prefix_chunks, leftover_frames).

    whole_prefix_chunks = P // chunk_width is the scheduler's ``chunk_offset``;
    the leftover P % chunk_width latent frames are written into frame 0.. of the
    first generated chunk before every forward. I2V: P = 1 -> (0, 1).

    Raises:
        InvalidInput: negative P (field ``prefix_video``) or non-positive ``chunk_width``.
    """
    _positive("prefix_video", prefix_latent_frames, allow_zero=True)
    _positive("chunk_width", chunk_width)
    return divmod(prefix_latent_frames, chunk_width)


@dataclass(frozen=True)
class ChunkLayout:
    """Global chunk layout of one job.

    Attributes:
        num_chunks: chunks the scheduler walks, prefix chunks included (reference ``chunk_num``).
        chunk_offset: whole prefix chunks (global indices 0 .. chunk_offset - 1), never emitted.
        leftover_frames: prefix latent frames written into chunk ``chunk_offset``.
        num_generated: chunks emitted to the user (num_chunks - chunk_offset).
    """

    num_chunks: int
    chunk_offset: int
    leftover_frames: int

    @property
    def num_generated(self) -> int:
        return self.num_chunks - self.chunk_offset


def job_layout(num_generated: int, prefix_latent_frames: int, chunk_width: int) -> ChunkLayout:
    """Layout of a job that emits ``num_generated`` chunks after a prefix of P latent frames.

    Raises:
        InvalidInput: ``num_chunks`` < 1, or as :func:`prefix_split`.
    """
    _positive("num_chunks", num_generated)
    offset, leftover = prefix_split(prefix_latent_frames, chunk_width)
    return ChunkLayout(num_chunks=offset + num_generated, chunk_offset=offset, leftover_frames=leftover)


def reference_layout(num_latent_frames: int, prefix_latent_frames: int, chunk_width: int) -> ChunkLayout:
    """The reference's layout for ``num_frames // 4`` = L generated latent frames (``extract_feature_for_inference``).

    chunk_num = ceil((L + P) / chunk_width), chunk_offset = P // chunk_width; e.g.
    I2V with L = 8, P = 1, chunk_width 2 walks 5 chunks and emits 5.

    Raises:
        InvalidInput: negative L or as :func:`prefix_split`.
    """
    _positive("num_frames", num_latent_frames, allow_zero=True)
    offset, leftover = prefix_split(prefix_latent_frames, chunk_width)
    total = math.ceil((num_latent_frames + prefix_latent_frames) / chunk_width)
    return ChunkLayout(num_chunks=total, chunk_offset=offset, leftover_frames=leftover)


def chunk_latent_range(chunk: int, chunk_width: int) -> tuple[int, int]:
    """[start, end) latent frames of global chunk ``chunk`` along T."""
    _positive("chunk", chunk, allow_zero=True)
    _positive("chunk_width", chunk_width)
    return chunk * chunk_width, (chunk + 1) * chunk_width
