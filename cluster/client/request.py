"""``GenerateRequest`` builder of the SDK (:func:`make_request`, re-exported by :mod:`cluster.client.sdk`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from magi.v1 import generate_pb2 as pb

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
