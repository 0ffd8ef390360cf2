"""Fmp4ChunkEncoder: one independently decodable fMP4 segment per chunk, playable as a whole."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from stages.video import Fmp4ChunkEncoder, RawFramesEncoder, decode_video
from stages.video.fmp4 import _boxes, _find

H, W, FPS = 64, 96, 24


def _chunk(k: int, n: int = 24) -> np.ndarray:
    """Smoothly moving gradient (no scene cuts), brightness distinct per chunk k."""
    y, x = np.mgrid[0:H, 0:W]
    frames = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (x * 2 + i * 3) % 256
        frames[i, ..., 1] = (y * 3 + i) % 256
        frames[i, ..., 2] = 40 + 60 * k
    return frames


def _decode(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data)) as c:
        return list(c.decode(video=0))


def _top_boxes(data: bytes) -> list[bytes]:
    return [b.type for b in _boxes(data)]


@pytest.fixture(scope="module")
def stream():
    enc = Fmp4ChunkEncoder(W, H, FPS)
    chunks = [_chunk(k) for k in range(3)]
    parts = [enc.encode(c) for c in chunks]
    parts.append(enc.close())
    return enc, chunks, parts


def test_first_bytes_are_init_segment_then_one_fragment_per_chunk(stream):
    enc, _, parts = stream
    assert _top_boxes(parts[0]) == [b"ftyp", b"moov", b"moof", b"mdat"]
    assert parts[0].startswith(enc.init_segment)
    assert _top_boxes(parts[1]) == [b"moof", b"mdat"] and _top_boxes(parts[2]) == [b"moof", b"mdat"]
    assert parts[3] == b""
    assert enc.codec_string.startswith("avc1.") and len(enc.codec_string) == 11


def test_concatenation_plays_with_all_frames_in_order(stream):
    enc, chunks, parts = stream
    frames = _decode(b"".join(parts))
    assert len(frames) == 72 == enc.frames_encoded
    assert all((f.width, f.height) == (W, H) for f in frames)
    times = np.array([float(f.time) for f in frames])
    np.testing.assert_allclose(times, np.arange(72) / FPS, atol=1e-6)
    keys = [i for i, f in enumerate(frames) if f.key_frame]
    assert keys == [0, 24, 48]
    pixels = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    assert np.abs(pixels.astype(int) - np.concatenate(chunks).astype(int)).mean() < 4


def test_each_segment_decodes_alone_with_the_init_segment(stream):
    enc, chunks, parts = stream
    for k in range(3):
        segment = parts[k][len(enc.init_segment):] if k == 0 else parts[k]
        frames = _decode(enc.init_segment + segment)
        assert len(frames) == 24
        assert frames[0].key_frame and not any(f.key_frame for f in frames[1:])
        assert float(frames[0].time) == pytest.approx(24 * k / FPS)
        pixels = np.stack([f.to_ndarray(format="rgb24") for f in frames])
        assert np.abs(pixels.astype(int) - chunks[k].astype(int)).mean() < 4


def test_fragment_headers_are_restamped(stream):
    _, _, parts = stream
    data = b"".join(parts)
    seqs, times = [], []
    for moof in (b for b in _boxes(data) if b.type == b"moof"):
        mfhd = _find(data, moof, [b"mfhd"])[0]
        seqs.append(struct.unpack_from(">I", data, mfhd.body + 4)[0])
        tfdt = _find(data, moof, [b"traf", b"tfdt"])[0]
        times.append(struct.unpack_from(">Q", data, tfdt.body + 4)[0])
    assert seqs == [1, 2, 3]
    assert times[0] == 0 and times[1] - times[0] == times[2] - times[1] > 0


def test_uneven_chunk_lengths_and_decode_video_roundtrip():
    enc = Fmp4ChunkEncoder(W, H, FPS)
    data = b"".join(enc.encode(_chunk(k, n)) for k, n in enumerate([24, 1, 5])) + enc.close()
    assert len(_decode(data)) == 30
    out = decode_video(data, height=H, width=W, max_frames=100, aspect_policy="fit")
    assert out.shape == (30, H, W, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        Fmp4ChunkEncoder(95, 64, 24)
    with pytest.raises(ValueError, match="fps"):
        Fmp4ChunkEncoder(96, 64, 0)
    enc = Fmp4ChunkEncoder(W, H, FPS)
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(_chunk(0).astype(np.float32))
    with pytest.raises(ValueError):
        enc.encode(_chunk(0)[:, :32])
    with pytest.raises(ValueError):
        enc.encode(_chunk(0)[:0])
    enc.close()
    with pytest.raises(ValueError, match="closed"):
        enc.encode(_chunk(0))


def test_raw_frames_encoder_roundtrip():
    enc = RawFramesEncoder(W, H)
    chunk = _chunk(1, 5)
    data = enc.encode(chunk)
    assert len(data) == 5 * enc.frame_bytes and enc.frames_in(data) == 5
    np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(-1, H, W, 3), chunk)
    assert enc.close() == b""
    with pytest.raises(ValueError):
        enc.encode(chunk[..., :2])
    with pytest.raises(ValueError):
        enc.frames_in(data[:-1])
