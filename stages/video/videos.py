"""Untrusted video bytes -> validated RGB uint8 frames at the model's resolution (V2V prefix).

Decoding uses PyAV (FFmpeg). Safety: the demuxer is chosen by content among
:data:`ALLOWED_DEMUXERS` only (FFmpeg's ``format_whitelist``; a JPEG renamed
``.mp4``, which FFmpeg would happily open as a one-frame ``jpeg_pipe`` "video",
is rejected), nested protocols are disabled (``protocol_whitelist``), declared
frame size is checked before decoding, and the number of decoded frames is
capped. The whole stream is always decoded, so a truncated or corrupt file is
rejected instead of silently yielding a partial prefix.

Frames are taken in presentation order, rotated by their display-matrix
rotation (phone videos), optionally resampled to ``fps`` the way FFmpeg's
``fps`` filter does (reference ``ffmpeg_v2v`` runs ``fps=fps`` then ``scale``),
and resized per ``aspect_policy`` exactly like images
(:func:`stages.video.images.fit_image`).
"""

from __future__ import annotations

import io
import math
from collections import deque
from typing import Iterator, Literal

import av
import numpy as np
from PIL import Image

from stages.errors import InvalidInput
from stages.video.images import AspectPolicy, check_dimensions, check_payload, fit_image

#: FFmpeg demuxers accepted (mp4/mov, mkv/webm, avi, animated gif).
ALLOWED_DEMUXERS = ("mov", "mp4", "matroska", "webm", "avi", "gif")
#: Largest upload accepted, bytes.
MAX_VIDEO_BYTES = 256 * 1024 * 1024
#: Largest declared frame, pixels (4K UHD).
MAX_VIDEO_PIXELS = 3840 * 2160
#: Most frames decoded from one upload (100 s at 24 fps).
MAX_INPUT_FRAMES = 2400
_OPEN_OPTIONS = {"format_whitelist": ",".join(ALLOWED_DEMUXERS), "protocol_whitelist": "none"}


def _open(data: bytes, field: str) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r", options=dict(_OPEN_OPTIONS))
    except Exception as exc:  # noqa: BLE001 - any demuxer failure on untrusted bytes is bad input
        raise InvalidInput(
            field, f"is not a readable video in a supported container ({', '.join(ALLOWED_DEMUXERS)})") from exc


def _video_stream(container: av.container.InputContainer, field: str) -> av.video.stream.VideoStream:
    """The first video stream, if its codec is one FFmpeg can decode here.

    A sample entry with an unknown codec tag (``avc1`` overwritten) or a cut-off
    ``moov`` leaves the stream without a codec context.
    """
    if not container.streams.video:
        raise InvalidInput(field, "has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InvalidInput(field, "uses an unknown or unsupported video codec, or its header is damaged")
    return stream


def _to_image(frame: av.VideoFrame, height: int, width: int, aspect_policy: AspectPolicy) -> Image.Image:
    """``frame`` as an RGB image of exactly (W, H), display rotation applied.

    When the policy shrinks the frame, FFmpeg's swscale first converts to RGB
    *and* scales (bicubic, as the reference's ``scale`` filter) in one pass to
    the policy's size, which is several times cheaper than converting at full
    resolution; :func:`~stages.video.images.fit_image` then makes the exact
    crop/pad/stretch. ``frame.rotation`` is the counter-clockwise angle (degrees).
    """
    angle = int(getattr(frame, "rotation", 0) or 0) % 360
    th, tw = (width, height) if angle in (90, 270) else (height, width)  # target before rotation
    w, h = frame.width, frame.height
    if aspect_policy == "fit":
        iw, ih = min(w, tw), min(h, th)
    else:
        scale = max(tw / w, th / h) if aspect_policy == "crop" else min(tw / w, th / h)
        iw, ih = min(w, math.ceil(w * scale)), min(h, math.ceil(h * scale))
    if (iw, ih) != (w, h):
        image = frame.reformat(width=iw, height=ih, format="rgb24", interpolation="BICUBIC").to_image()
    else:
        image = frame.to_image()
    if angle:
        image = image.rotate(angle, expand=True)
    return fit_image(image, height, width, aspect_policy)


def _slot(seconds: float, fps: float) -> int:
    """Output slot of a time, rounding half away from zero (FFmpeg ``AV_ROUND_NEAR_INF``)."""
    return math.floor(seconds * fps + 0.5)


def _resample(frames: Iterator[av.VideoFrame], fps: float | None, field: str) -> Iterator[av.VideoFrame]:
    """Constant-rate frames at ``fps`` (FFmpeg ``fps`` filter, rounding "near").

    Output slot n (time n / fps after the first frame) shows the latest input frame
    whose start time rounds to a slot <= n: inputs sharing a slot keep the last one,
    gaps repeat the previous frame, and the stream ends at the slot of the last
    frame's end time (so 96 frames at 24 fps give 48 at 12 fps, 10 frames of
    100 ms give 24 at 24 fps). ``fps=None`` passes frames through.
    """
    if fps is None:
        yield from frames
        return
    start, pending, slot, end_slot = None, None, 0, 0
    for frame in frames:
        if frame.time is None:
            raise InvalidInput(field, f"cannot resample to {fps} fps: a frame has no timestamp")
        t = float(frame.time)
        start = t if start is None else start
        target = max(_slot(t - start, fps), slot)
        while pending is not None and slot < target:
            yield pending
            slot += 1
        pending = frame
        duration = float((frame.duration or 0) * frame.time_base) if frame.time_base else 0.0
        end_slot = _slot(t + duration - start, fps) if duration > 0 else target + 1
    while pending is not None and (slot < end_slot or slot == 0):
        yield pending
        slot += 1


def _decoded(container: av.container.InputContainer, field: str, max_input_frames: int) -> Iterator[av.VideoFrame]:
    """Every frame of the first video stream; errors and overlong streams become InvalidInput."""
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"  # frame threading hides decode errors of a truncated stream
    count, first, end = 0, None, None
    try:
        for packet in container.demux(stream):
            if packet.is_corrupt:
                raise InvalidInput(field, f"truncated or corrupt packet after {count} decoded frames")
            for frame in packet.decode():
                count += 1
                if count > max_input_frames:
                    raise InvalidInput(field, f"has more than {max_input_frames} frames")
                if frame.time is not None:
                    first = float(frame.time) if first is None else first
                    end = float(frame.time) + float((frame.duration or 0) * frame.time_base)
                yield frame
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder errors on untrusted data
        raise InvalidInput(field, f"truncated or corrupt video after {count} decoded frames") from exc
    _check_complete(container, stream, first, end, field)


def _declared_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """Video duration the container declares, seconds (None if unknown or ambiguous)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _check_complete(container, stream, first: float | None, end: float | None, field: str) -> None:
    """Reject a stream that ends well before its declared duration (cut-off file).

    Some containers (Matroska, WebM) hit a clean end-of-file when cut, so decoding
    alone does not notice. Tolerance: 3 frame intervals or 0.25 s, whichever is more.
    """
    declared = _declared_duration(container, stream)
    if declared is None or first is None or end is None:
        return
    rate = float(stream.average_rate) if stream.average_rate else 24.0
    if end - first < declared - max(3.0 / rate, 0.25):
        raise InvalidInput(field, f"truncated: decoded {end - first:.2f} s of a declared {declared:.2f} s")


def decode_video(data: bytes, *, height: int, width: int, max_frames: int, field: str = "prefix_video",
                 keep: Literal["first", "last"] = "last", fps: float | None = None,
                 aspect_policy: AspectPolicy = "crop", max_bytes: int = MAX_VIDEO_BYTES,
                 max_pixels: int = MAX_VIDEO_PIXELS, max_input_frames: int = MAX_INPUT_FRAMES) -> np.ndarray:
    """Decode and validate an uploaded video for video continuation (V2V prefix).

    Args:
        data: the file's bytes (container sniffed from content).
        height, width: output frame size H, W in pixels.
        max_frames: most frames returned.
        field: request field named in errors.
        keep: which ``max_frames`` frames to return when the video is longer:
            ``"last"`` (default: a continuation continues from the end) or
            ``"first"`` (the reference ``process_prefix_video`` keeps the first 32).
        fps: resample to this frame rate first (reference ``ffmpeg_v2v``); None keeps
            the decoded frames as they are.
        aspect_policy: ``"crop"`` | ``"pad"`` | ``"fit"``, as for images.
        max_bytes, max_pixels, max_input_frames: limits on the upload, the declared
            frame size (W x H) and the number of decoded frames.

    Returns:
        uint8 (F, H, W, 3) RGB with 1 <= F <= ``max_frames``.

    Raises:
        InvalidInput: empty, too large, not a supported container, no video
            stream, unknown codec or damaged header, declared size over the limit,
            truncated or corrupt stream, more than ``max_input_frames`` frames, no
            decodable frame. The message is in words (no FFmpeg internals); the
            underlying PyAV error, if any, is its ``__cause__``.
        ValueError: bad ``height``/``width``/``max_frames``/``keep`` (caller bugs).
    """
    if height < 1 or width < 1 or max_frames < 1 or keep not in ("first", "last"):
        raise ValueError(f"bad arguments: height={height} width={width} max_frames={max_frames} keep={keep!r}")
    data = check_payload(data, field=field, max_bytes=max_bytes)
    try:
        with _open(data, field) as container:
            ctx = _video_stream(container, field).codec_context
            check_dimensions(ctx.width, ctx.height, field=field, max_pixels=max_pixels)
            kept: deque[av.VideoFrame] | list[av.VideoFrame] = deque(maxlen=max_frames) if keep == "last" else []
            for frame in _resample(_decoded(container, field, max_input_frames), fps, field):
                if keep == "last" or len(kept) < max_frames:
                    kept.append(frame)
            if not kept:
                raise InvalidInput(field, "contains no decodable video frame")
            return np.stack([np.asarray(_to_image(f, height, width, aspect_policy)) for f in kept])
    except (InvalidInput, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever else FFmpeg/PyAV raise on untrusted bytes
        raise InvalidInput(field, "could not be decoded as a video (damaged or unsupported file)") from exc
