"""Request validation: ``magi.v1.GenerateRequest`` -> :class:`cluster.messages.JobSpec`.

Plain Python (no Ray), used by the ingress deployment and in-process. Every
rejection raises :class:`stages.errors.InvalidInput` whose ``field`` is the
request field's path as in the .proto (``prompt_segments[1].text``, ``num_chunks``,
``image`` ...); the ingress maps it to gRPC ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import numpy as np
from google.protobuf.message import DecodeError, Message

from cluster.config import RequestLimits
from cluster.messages import JobSpec, OutputFormat, PromptSegment
from cluster.serve.cancels import check_job_id
from magi.v1 import generate_pb2 as pb
from stages.config import ModelConfig
from stages.errors import InvalidInput
from stages.text_encoder.cleaning import validate_prompt
from stages.video import decode_image, decode_video

MAX_SEED = 2**63 - 1

_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: OutputFormat.FMP4,
    pb.OUTPUT_FORMAT_FMP4: OutputFormat.FMP4,
    pb.OUTPUT_FORMAT_RAW_RGB: OutputFormat.RAW_RGB,
}


def parse_request(message_class: type[Message], data: bytes | Message, limits: RequestLimits) -> Message:
    """A request message from the bytes Serve's proxy passes on (:mod:`cluster.serve.servicers`).

    An already parsed ``message_class`` instance is returned as is.

    Raises:
        InvalidInput: field ``request``: longer than ``limits.request_cap()`` bytes (a backstop:
            the proxy refuses those first), or not a valid serialized ``message_class``.
    """
    if isinstance(data, message_class):
        return data
    name = message_class.DESCRIPTOR.full_name
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput("request", f"not a valid {name}")
    if len(data) > limits.request_cap():
        raise InvalidInput("request", f"is {len(data)} bytes, above the limit of {limits.request_cap()}")
    try:
        return message_class.FromString(bytes(data))
    except DecodeError as exc:
        raise InvalidInput("request", f"not a valid {name} (unparsable bytes or a string "
                                      "field that is not UTF-8)") from exc


def request_spec(req: pb.GenerateRequest, model: ModelConfig, limits: RequestLimits) -> JobSpec:
    """:func:`validate_request` with the job id the client chose (checked) or a fresh one.

    Raises:
        InvalidInput: a bad ``job_id`` or the first bad field found (named).
    """
    job_id = check_job_id(req.job_id) if req.job_id else uuid.uuid4().hex
    return validate_request(req, model, limits, job_id)


def validate_request(
    req: pb.GenerateRequest, model: ModelConfig, limits: RequestLimits, job_id: str
) -> JobSpec:
    """Check every field of ``req`` and decode its conditioning media.

    The image / prefix video are decoded here (``stages.video``), so the returned
    spec holds uint8 arrays at the job's (height, width): image (H, W, 3), prefix
    video (F, H, W, 3).

    Raises:
        InvalidInput: the first bad field found (its path is ``.field``).
    """
    num_chunks = _num_chunks(req.num_chunks, limits)
    height, width = _resolution(req.height, req.width, model, limits)
    spec = JobSpec(
        job_id=job_id,
        prompt_segments=_prompt_segments(req.prompt_segments, num_chunks, limits),
        num_chunks=num_chunks,
        height=height,
        width=width,
        seed=_seed(req.seed),
        num_steps=_num_steps(req.num_steps, model, limits),
        output_format=_output_format(req.output_format),
    )
    which = req.WhichOneof("condition")
    if which == "image":
        return replace(spec, image=_image(req.image, height, width, limits))
    if which == "prefix_video":
        return replace(spec, prefix_video=_prefix_video(req.prefix_video, height, width, model, limits))
    return spec


def validate_update(req: pb.UpdatePromptRequest, limits: RequestLimits) -> tuple[str, int, str]:
    """Check an ``UpdatePrompt`` request; returns (job_id, start_chunk, trimmed text).

    Only what needs no job is checked here; the engine checks ``start_chunk`` against the
    job (already in flight, past the end).

    Raises:
        InvalidInput: ``job_id`` not a job id (:func:`cluster.serve.cancels.check_job_id`),
            ``start_chunk`` < 0, or an unusable ``text``.
    """
    check_job_id(req.job_id)
    if req.start_chunk < 0:
        raise InvalidInput("start_chunk", f"must be >= 0, got {req.start_chunk}")
    return req.job_id, req.start_chunk, _prompt_text(req.text, "text", limits)


def _num_chunks(value: int, limits: RequestLimits) -> int:
    if not 1 <= value <= limits.max_chunks:
        raise InvalidInput("num_chunks", f"must be between 1 and {limits.max_chunks}, got {value}")
    return value


def _resolution(height: int, width: int, model: ModelConfig, limits: RequestLimits) -> tuple[int, int]:
    if height == 0 and width == 0:
        return model.height, model.width
    step = model.vae_spatial_factor * model.dit.patch_size
    for name, value, limit in (("height", height, limits.max_height), ("width", width, limits.max_width)):
        if value == 0:
            raise InvalidInput(name, "set both height and width, or neither (0 = model default)")
        if not step <= value <= limit:
            raise InvalidInput(name, f"must be between {step} and {limit} pixels, got {value}")
        if value % step:
            raise InvalidInput(name, f"must be a multiple of {step} pixels, got {value}")
    return height, width


def _num_steps(value: int, model: ModelConfig, limits: RequestLimits) -> int:
    if value == 0:
        return model.sampling.num_steps
    window = model.sampling.window_size
    if not window <= value <= limits.max_steps:
        raise InvalidInput("num_steps", f"must be between {window} and {limits.max_steps}, got {value}")
    if value % window:
        raise InvalidInput("num_steps", f"must be a multiple of window_size {window}, got {value}")
    return value


def _seed(value: int) -> int:
    if value > MAX_SEED:
        raise InvalidInput("seed", f"must be at most 2^63 - 1, got {value}")
    return value


def _output_format(value: int) -> OutputFormat:
    try:
        return _FORMATS[value]
    except KeyError:
        raise InvalidInput("output_format", f"unknown value {value}") from None


def _prompt_segments(segments, num_chunks: int, limits: RequestLimits) -> tuple[PromptSegment, ...]:
    if not segments:
        raise InvalidInput("prompt_segments", "at least one prompt segment is required")
    if len(segments) > limits.max_prompt_segments:
        raise InvalidInput(
            "prompt_segments", f"at most {limits.max_prompt_segments} segments, got {len(segments)}"
        )
    out = []
    for i, seg in enumerate(segments):
        field = f"prompt_segments[{i}]"
        if i == 0 and seg.start_chunk != 0:
            raise InvalidInput(f"{field}.start_chunk", f"the first segment must start at 0, got {seg.start_chunk}")
        if i > 0 and seg.start_chunk <= out[-1].start_chunk:
            raise InvalidInput(f"{field}.start_chunk", "start_chunk must increase strictly from segment to segment")
        if seg.start_chunk >= num_chunks:
            raise InvalidInput(
                f"{field}.start_chunk", f"must be below num_chunks ({num_chunks}), got {seg.start_chunk}"
            )
        out.append(PromptSegment(seg.start_chunk, _prompt_text(seg.text, f"{field}.text", limits)))
    return tuple(out)


def _prompt_text(text: str, field: str, limits: RequestLimits) -> str:
    """The prompt, trimmed, after the text encoder's own checks (length, NUL, surrogates,
    empty after caption cleaning: :func:`stages.text_encoder.cleaning.validate_prompt`)."""
    validate_prompt(text, field=field, max_chars=limits.max_prompt_chars)
    return text.strip()


def _image(data: bytes, height: int, width: int, limits: RequestLimits) -> np.ndarray:
    return decode_image(data, height=height, width=width, field="image", max_bytes=limits.max_image_bytes)


def _prefix_video(data: bytes, height: int, width: int, model: ModelConfig, limits: RequestLimits) -> np.ndarray:
    """The last frames of the upload, trimmed to whole VAE frame groups (``vae.patch_length``)."""
    frames = decode_video(data, height=height, width=width, max_frames=limits.max_prefix_frames,
                          field="prefix_video", max_bytes=limits.max_video_bytes)
    group = model.vae.patch_length
    usable = len(frames) - len(frames) % group
    if usable == 0:
        raise InvalidInput("prefix_video", f"has {len(frames)} frame(s); at least {group} are needed")
    return frames[len(frames) - usable:]
