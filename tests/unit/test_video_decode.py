"""decode_video on the real prefix video, the fuzz corpus and generated clips."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from stages.errors import InvalidInput
from stages.video import decode_video, fit_image
from tests import shared_data

INPUTS = shared_data.inputs_dir()
BAD = INPUTS / "bad"
PREFIX = INPUTS / "videos" / "MAGI-1" / "example" / "assets" / "prefix_video.mp4"
needs_inputs = shared_data.skip_unless(PREFIX, "shared inputs")
ACCEPTED = {"single_frame_448x300.mp4", "animated_chelsea_10f.gif"}


def _clip(n: int = 30, w: int = 96, h: int = 64, fmt: str = "mp4", fps: int = 24, rotation: int = 0,
          options: dict | None = None) -> tuple[bytes, np.ndarray]:
    """An H.264 clip whose frame i is a flat grey of level 8 i (plus a marker column)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = 8 * i % 256
        frames[i, :, : w // 4, 0] = 255
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "10", "bf": "0"}
        if rotation:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue(), frames


def _frames_with_pyav(data: bytes, h: int, w: int) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([np.asarray(fit_image(f.to_image(), h, w)) for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def prefix_frames() -> np.ndarray:
    """All 96 frames of the prefix video, full-resolution RGB then Pillow crop-resize to 64 x 112."""
    return _frames_with_pyav(PREFIX.read_bytes(), 64, 112).astype(int)


@needs_inputs
@pytest.mark.parametrize("keep", ["first", "last"])
def test_prefix_video_keeps_first_or_last_frames(keep, prefix_frames):
    out = decode_video(PREFIX.read_bytes(), height=64, width=112, max_frames=32, keep=keep)
    assert out.shape == (32, 64, 112, 3) and out.dtype == np.uint8
    every = prefix_frames
    assert every.shape[0] == 96
    right, wrong = (every[:32], every[-32:]) if keep == "first" else (every[-32:], every[:32])
    # swscale pre-scaling differs from a full-resolution Pillow resize by rounding only
    err = np.abs(out.astype(int) - right).mean(axis=(1, 2, 3))
    assert err.max() < 1.5
    assert np.abs(out.astype(int) - wrong).mean() > 3 * err.mean()


@needs_inputs
def test_prefix_video_shorter_than_max_frames_is_returned_whole():
    assert decode_video(PREFIX.read_bytes(), height=32, width=32, max_frames=500).shape[0] == 96


@needs_inputs
def test_fps_resampling_halves_and_keeps_rate():
    data = PREFIX.read_bytes()
    same = decode_video(data, height=32, width=32, max_frames=500, fps=24)
    assert same.shape[0] == 96
    half = decode_video(data, height=32, width=32, max_frames=500, fps=12)
    assert half.shape[0] == 48
    np.testing.assert_array_equal(half[0], same[0])


@needs_inputs
@pytest.mark.parametrize("name", sorted(p.name for p in BAD.glob("*") if p.is_file()) if BAD.exists() else [])
def test_every_bad_file_is_decoded_or_rejected_cleanly(name):
    data = (BAD / name).read_bytes()
    if name in ACCEPTED:
        out = decode_video(data, height=64, width=64, max_frames=24)
        assert out.ndim == 4 and out.shape[1:] == (64, 64, 3) and out.shape[0] >= 1
    else:
        with pytest.raises(InvalidInput) as err:
            decode_video(data, height=64, width=64, max_frames=24)
        assert err.value.field == "prefix_video"


@needs_inputs
def test_truncated_prefix_video_is_rejected_not_partially_used():
    data = (BAD / "truncated_64KiB_prefix_video.mp4").read_bytes()
    with pytest.raises(InvalidInput, match="truncated"):
        decode_video(data, height=64, width=64, max_frames=8, keep="first")


@needs_inputs
def test_single_frame_and_jpeg_named_mp4():
    assert decode_video((BAD / "single_frame_448x300.mp4").read_bytes(), height=32, width=32,
                        max_frames=32).shape == (1, 32, 32, 3)
    with pytest.raises(InvalidInput, match="supported container"):
        decode_video((BAD / "jpeg_named.mp4").read_bytes(), height=32, width=32, max_frames=32)


def test_generated_clip_content_and_order():
    data, frames = _clip(n=30)
    out = decode_video(data, height=64, width=96, max_frames=30, aspect_policy="fit")
    assert out.shape == (30, 64, 96, 3)
    assert np.abs(out.astype(int) - frames.astype(int)).mean() < 3


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_cut_files_are_rejected(fmt):
    data, _ = _clip(n=48, fmt=fmt, options={"movflags": "frag_keyframe+empty_moov"} if fmt == "mp4" else None)
    for fraction in (0.3, 0.6):
        with pytest.raises(InvalidInput, match="truncated|corrupt|supported container|no decodable"):
            decode_video(data[: int(len(data) * fraction)], height=32, width=32, max_frames=48)


def test_display_rotation_is_applied():
    data, frames = _clip(n=3, w=96, h=64, rotation=90)
    out = decode_video(data, height=96, width=64, max_frames=3, aspect_policy="fit")
    assert out.shape == (3, 96, 64, 3)
    # the red marker (left quarter of the stored frame) ends at the bottom after 90 deg CCW
    assert out[0, -20:, :, 0].mean() > 240 and out[0, :60, :, 0].mean() < 10


def test_limits():
    data, _ = _clip(n=30)
    with pytest.raises(InvalidInput, match="more than 10 frames"):
        decode_video(data, height=32, width=32, max_frames=5, max_input_frames=10)
    with pytest.raises(InvalidInput, match="96x64"):
        decode_video(data, height=32, width=32, max_frames=5, max_pixels=1000)
    with pytest.raises(InvalidInput, match="bytes"):
        decode_video(data, height=32, width=32, max_frames=5, max_bytes=100)
    with pytest.raises(InvalidInput, match="empty"):
        decode_video(b"", height=32, width=32, max_frames=5, field="video")


def test_audio_only_file_has_no_video_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(InvalidInput, match="no video stream"):
        decode_video(buf.getvalue(), height=32, width=32, max_frames=5)


def test_caller_errors_are_value_errors():
    data, _ = _clip(n=2)
    with pytest.raises(ValueError):
        decode_video(data, height=32, width=32, max_frames=0)
    with pytest.raises(ValueError):
        decode_video(data, height=32, width=32, max_frames=2, keep="middle")


def test_fps_resampling_of_a_30fps_clip_and_a_gif():
    data, _ = _clip(n=30, fps=30)
    out = decode_video(data, height=32, width=32, max_frames=100, fps=24)
    assert out.shape[0] == 24  # 1 s of video
    native = decode_video(data, height=32, width=32, max_frames=100)
    np.testing.assert_array_equal(out[0], native[0])
    if (BAD / "animated_chelsea_10f.gif").exists():  # 10 frames of 100 ms
        gif = (BAD / "animated_chelsea_10f.gif").read_bytes()
        assert decode_video(gif, height=32, width=32, max_frames=100, fps=24).shape[0] == 24


_INTERNALS = ("Error", "returned", "'<none>'", "Errno", "Traceback", "/")
#: Mutations FFmpeg cannot open or decode; the others may decode (FFmpeg trusts the H.264 SPS).
_MUST_REJECT = {"fourcc", "truncated_moov", "no_samples"}


def _mutations():
    from tests.media_mutations import mp4_mutations  # noqa: PLC0415

    return mp4_mutations(PREFIX.read_bytes()) if PREFIX.exists() else {}


@needs_inputs
@pytest.mark.parametrize("name", ["fourcc", "truncated_moov", "zero_size_track", "zero_dims", "huge_dims",
                                  "no_samples"])
def test_mutated_mp4_is_rejected_in_words_or_decoded(name):
    data = _mutations()[name]
    try:
        out = decode_video(data, height=32, width=32, max_frames=8)
    except InvalidInput as err:
        assert err.field == "prefix_video" and str(err).startswith("prefix_video: ")
        assert not any(bad in err.reason for bad in _INTERNALS), err.reason
        return
    assert name not in _MUST_REJECT, f"{name} decoded"
    assert out.shape[1:] == (32, 32, 3) and out.dtype == np.uint8


@needs_inputs
@pytest.mark.parametrize("name", sorted(p.name for p in BAD.iterdir() if p.is_file()) if BAD.exists() else [])
def test_every_bad_file_as_video_is_rejected_in_words_or_decoded(name):
    try:
        decode_video((BAD / name).read_bytes(), height=32, width=32, max_frames=8)
    except InvalidInput as err:
        assert not any(bad in err.reason for bad in _INTERNALS), err.reason
