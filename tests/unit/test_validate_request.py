"""Request validation: every rejection is InvalidInput naming the request field."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import RequestLimits
from cluster.messages import OutputFormat
from cluster.serve.validate import parse_request, validate_request, validate_update
from magi.v1 import generate_pb2 as pb
from stages.config import magi_tiny
from stages.errors import InvalidInput
from tests import shared_data

MODEL = magi_tiny()
LIMITS = RequestLimits(max_chunks=8, max_height=256, max_width=256, max_steps=16, max_prompt_chars=100,
                       max_prompt_segments=3, max_image_bytes=1000, max_video_bytes=1000)
INPUTS = shared_data.inputs_dir()  # ../shared/inputs (tests/shared_data.py)


def request(**kw) -> pb.GenerateRequest:
    kw.setdefault("prompt_segments", [pb.PromptSegment(start_chunk=0, text="a cat")])
    kw.setdefault("num_chunks", 2)
    return pb.GenerateRequest(**kw)


def rejected(req) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        validate_request(req, MODEL, LIMITS, "job")
    return info.value


def test_defaults_filled_in():
    spec = validate_request(request(seed=7), MODEL, LIMITS, "abc")
    assert (spec.job_id, spec.num_chunks, spec.seed) == ("abc", 2, 7)
    assert (spec.height, spec.width) == (MODEL.height, MODEL.width)
    assert spec.num_steps == MODEL.sampling.num_steps
    assert spec.output_format is OutputFormat.FMP4 and spec.image is None and spec.prefix_video is None
    assert spec.prompt_segments[0].text == "a cat"


def test_explicit_settings():
    req = request(height=64, width=96, num_steps=12, output_format=pb.OUTPUT_FORMAT_RAW_RGB, num_chunks=4,
                  prompt_segments=[pb.PromptSegment(start_chunk=0, text=" a "), pb.PromptSegment(start_chunk=2, text="b")])
    spec = validate_request(req, MODEL, LIMITS, "j")
    assert (spec.height, spec.width, spec.num_steps) == (64, 96, 12)
    assert spec.output_format is OutputFormat.RAW_RGB
    assert [(s.start_chunk, s.text) for s in spec.prompt_segments] == [(0, "a"), (2, "b")]


@pytest.mark.parametrize(
    "kw, field, words",
    [
        (dict(prompt_segments=[]), "prompt_segments", "at least one"),
        (dict(prompt_segments=[pb.PromptSegment(text="")]), "prompt_segments[0].text", "empty"),
        (dict(prompt_segments=[pb.PromptSegment(text=" \t\n\u200b\ufeff\u2060")]), "prompt_segments[0].text", "empty"),
        (dict(prompt_segments=[pb.PromptSegment(text="a\x00b")]), "prompt_segments[0].text", "NUL"),
        (dict(prompt_segments=[pb.PromptSegment(text="x" * 101)]), "prompt_segments[0].text", "too long"),
        (dict(prompt_segments=[pb.PromptSegment(start_chunk=1, text="a")]), "prompt_segments[0].start_chunk", "start at 0"),
        (dict(prompt_segments=[pb.PromptSegment(text="a"), pb.PromptSegment(start_chunk=0, text="b")]),
         "prompt_segments[1].start_chunk", "increase"),
        (dict(prompt_segments=[pb.PromptSegment(text="a"), pb.PromptSegment(start_chunk=2, text="b")]),
         "prompt_segments[1].start_chunk", "below num_chunks"),
        (dict(prompt_segments=[pb.PromptSegment(start_chunk=i, text="a") for i in range(4)], num_chunks=8),
         "prompt_segments", "at most 3"),
        (dict(num_chunks=0), "num_chunks", "between 1 and 8"),
        (dict(num_chunks=-1), "num_chunks", "got -1"),
        (dict(num_chunks=1_000_000), "num_chunks", "between 1 and 8"),
        (dict(height=64), "width", "both"),
        (dict(width=64), "height", "both"),
        (dict(height=72, width=64), "height", "multiple of 16"),
        (dict(height=64, width=512), "width", "between 16 and 256"),
        (dict(height=-16, width=64), "height", "between"),
        (dict(num_steps=6), "num_steps", "multiple of window_size 4"),
        (dict(num_steps=20), "num_steps", "between 4 and 16"),
        (dict(num_steps=-4), "num_steps", "between"),
        (dict(seed=2**63), "seed", "2^63"),
        (dict(output_format=7), "output_format", "unknown value 7"),
        (dict(image=b""), "image", "empty"),
        (dict(image=b"x" * 1001), "image", "above the limit of 1000"),
        (dict(prefix_video=b""), "prefix_video", "empty"),
        (dict(prefix_video=b"x" * 1001), "prefix_video", "above the limit of 1000"),
    ],
)
def test_rejections_name_the_field(kw, field, words):
    err = rejected(request(**kw))
    assert err.field == field
    assert str(err).startswith(f"{field}: ") and words in str(err)


def test_nasty_prompts_are_accepted_or_rejected_cleanly():
    nasty = json.loads((INPUTS / "bad" / "nasty_prompts.json").read_text(encoding="utf-8"))
    limits = RequestLimits(max_prompt_chars=4096)
    outcomes = {}
    for item in nasty:
        try:
            spec = validate_request(request(prompt_segments=[pb.PromptSegment(text=item["prompt"])]), MODEL, limits, "j")
            outcomes[item["id"]] = "ok"
            assert spec.prompt_segments[0].text.strip()
        except InvalidInput as err:
            assert err.field == "prompt_segments[0].text"
            outcomes[item["id"]] = err.reason
    for rejected_id in ("empty", "single_space", "ascii_whitespace", "unicode_whitespace", "newlines_1000", "nul_only"):
        assert outcomes[rejected_id] != "ok", rejected_id
    assert outcomes["long_100k_single_char"].startswith("too long")
    for accepted_id in ("emoji_only", "rtl_arabic", "cjk_mixed", "zalgo", "sql_injection_1", "type_confusion_null"):
        assert outcomes[accepted_id] == "ok", accepted_id


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120), st.integers(-5, 20))
def test_any_text_and_chunk_count_is_handled(text, num_chunks):
    req = request(prompt_segments=[pb.PromptSegment(text=text)], num_chunks=num_chunks)
    try:
        spec = validate_request(req, MODEL, LIMITS, "j")
    except InvalidInput as err:
        assert err.field in ("num_chunks", "prompt_segments[0].text")
    else:
        assert 1 <= spec.num_chunks <= LIMITS.max_chunks and spec.prompt_segments[0].text


BAD_IMAGES = ["zero_bytes.png", "truncated_100B.png", "text_file_named.png", "huge_dims_65535x65535.png",
              "huge_dims_12000x12000.png", "bad_ihdr_crc.png", "truncated_half.jpg"]


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_unreadable_images_are_rejected(name):
    data = (INPUTS / "bad" / name).read_bytes()
    err = rejected(request(image=data))
    assert err.field == "image"


@pytest.mark.parametrize("name", ["zero_bytes.mp4", "truncated_64KiB_prefix_video.mp4", "single_frame_448x300.mp4"])
def test_unreadable_prefix_videos_are_rejected(name):
    data = (INPUTS / "bad" / name).read_bytes()
    err = rejected(request(prefix_video=data))
    assert err.field == "prefix_video"


def test_good_image_is_decoded_to_the_job_size():
    data = (INPUTS / "images" / "skimage" / "chelsea.png").read_bytes()
    spec = validate_request(request(image=data, height=64, width=96), MODEL, RequestLimits(), "j")
    assert spec.image.shape == (64, 96, 3) and str(spec.image.dtype) == "uint8"


def test_prefix_video_is_trimmed_to_whole_frame_groups():
    data = (INPUTS / "videos" / "MAGI-1" / "example" / "assets" / "prefix_video.mp4").read_bytes()
    limits = RequestLimits(max_prefix_frames=30)
    spec = validate_request(request(prefix_video=data, height=64, width=64), MODEL, limits, "j")
    assert spec.prefix_video.shape == (28, 64, 64, 3)  # last 30 frames, cut to a multiple of 4


def _valid_messages():
    return [request(), pb.CancelRequest(job_id="job-1"),
            pb.UpdatePromptRequest(job_id="job-1", start_chunk=1, text="a dog")]


@pytest.mark.parametrize("message", _valid_messages(), ids=lambda m: type(m).__name__)
def test_parse_request_refuses_unparsable_bytes_naming_request(message):
    data = message.SerializeToString()
    cls = type(message)
    assert cls.FromString(data) == parse_request(cls, data, LIMITS) == parse_request(cls, message, LIMITS)
    text = next(v for _, v in message.ListFields() if isinstance(v, str)) if not isinstance(
        message, pb.GenerateRequest) else message.prompt_segments[0].text
    for bad in (data[:1], data.replace(text.encode(), b"\xff" * len(text.encode()), 1)):
        with pytest.raises(InvalidInput, match=f"not a valid {cls.DESCRIPTOR.full_name}") as info:
            parse_request(cls, bad, LIMITS)
        assert info.value.field == "request"


def test_parse_request_refuses_a_request_over_the_cap():
    cap = LIMITS.request_cap()
    assert cap == max(LIMITS.max_image_bytes, LIMITS.max_video_bytes) + 1024 * 1024
    data = request(image=bytes(cap)).SerializeToString()
    with pytest.raises(InvalidInput, match=f"above the limit of {cap}"):
        parse_request(pb.GenerateRequest, data, LIMITS)


def test_update_prompt_job_id_must_be_a_job_id():
    for job_id in ("", "a b", "jobs/x", "j" * 65):
        with pytest.raises(InvalidInput) as info:
            validate_update(pb.UpdatePromptRequest(job_id=job_id, start_chunk=1, text="x"), LIMITS)
        assert info.value.field == "job_id"
