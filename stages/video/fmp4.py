"""Chunk-wise fragmented-MP4 (H.264) encoding for streaming video chunks to clients.

Each chunk (e.g. 24 frames from one VAE decode) becomes one fMP4 media segment
(``moof`` + ``mdat``) that starts with an IDR keyframe and is returned as soon as
the chunk is encoded. The muxer's own fragmenting (``movflags=frag_keyframe``)
only flushes a fragment when the *next* keyframe arrives or at close, which would
hold every chunk back until the next one is decoded; so each chunk is encoded by
a fresh libx264 encoder into a complete fMP4 in memory, and its media boxes are
re-stamped to continue the stream: ``mfhd.sequence_number`` counts fragments
across chunks and ``tfdt.baseMediaDecodeTime`` carries the running decode time.
The init segment (``ftyp`` + ``moov``) of the first chunk is sent once, first;
later chunks' encoders produce the same codec configuration (``avcC``: same
settings, same SPS/PPS), which is checked.

The concatenation of all returned bytes is one playable MP4 with exactly the
frames given (no B-frames: decode order = presentation order, first pts 0), and
``init + segment_k`` alone decodes chunk k.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import av
import numpy as np

_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"}


@dataclass(frozen=True)
class _Box:
    type: bytes
    start: int  # offset of the box header
    body: int  # offset of the payload
    end: int


def _boxes(data: bytes | bytearray, start: int = 0, end: int | None = None) -> list[_Box]:
    """Top-level ISO BMFF boxes in ``data[start:end]`` (ISO/IEC 14496-12 section 4.2)."""
    end = len(data) if end is None else end
    out = []
    while start + 8 <= end:
        size, typ = struct.unpack_from(">I4s", data, start)
        header = 8
        if size == 1:
            size = struct.unpack_from(">Q", data, start + 8)[0]
            header = 16
        elif size == 0:
            size = end - start
        if size < header or start + size > end:
            raise ValueError(f"malformed MP4 box {typ!r} at offset {start}")
        out.append(_Box(typ, start, start + header, start + size))
        start += size
    return out


def _find(data: bytes | bytearray, box: _Box, path: list[bytes]) -> list[_Box]:
    """All boxes reached from container ``box`` by the type ``path``."""
    found = [b for b in _boxes(data, box.body, box.end) if b.type == path[0]]
    if len(path) == 1:
        return found
    return [leaf for b in found if b.type in _CONTAINERS for leaf in _find(data, b, path[1:])]


def _timescale(init: bytes) -> int:
    """Video track timescale, from ``moov/trak/mdia/mdhd``."""
    moov = next(b for b in _boxes(init) if b.type == b"moov")
    mdhd = _find(init, moov, [b"trak", b"mdia", b"mdhd"])[0]
    version = init[mdhd.body]
    return struct.unpack_from(">I", init, mdhd.body + (20 if version == 1 else 12))[0]


def _avcc(init: bytes) -> bytes:
    """The ``avcC`` box (SPS/PPS) of the init segment."""
    i = init.find(b"avcC")
    if i < 4:
        raise ValueError("init segment has no avcC box")
    size = struct.unpack_from(">I", init, i - 4)[0]
    return init[i - 4:i - 4 + size]


class Fmp4ChunkEncoder:
    """Encode video chunks into a streamable fragmented MP4 (H.264 High, yuv420p).

    Args:
        width, height: frame size in pixels (W, H); both even (yuv420p).
        fps: frames per second (integer, e.g. 24).
        crf: libx264 constant rate factor (quality; lower = better, larger).
        preset: libx264 speed preset.

    Raises:
        ValueError: odd or non-positive size, or non-positive fps.
    """

    def __init__(self, width: int, height: int, fps: int, *, crf: int = 20, preset: str = "veryfast"):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even for yuv420p, got {width}x{height}")
        if int(fps) != fps or fps <= 0:
            raise ValueError(f"fps must be a positive integer, got {fps}")
        self.width, self.height, self.fps = width, height, int(fps)
        self._options = {"crf": str(crf), "preset": preset, "bf": "0"}
        self._init: bytes | None = None
        self._timescale = 0
        self._sequence = 0  # last mfhd.sequence_number sent
        self._decode_time = 0  # in timescale units
        self._closed = False
        self.frames_encoded = 0

    @property
    def init_segment(self) -> bytes | None:
        """``ftyp`` + ``moov`` once the first chunk was encoded, else None."""
        return self._init

    @property
    def codec_string(self) -> str | None:
        """RFC 6381 codec string (e.g. ``avc1.64000c``) for MSE clients, once known."""
        if self._init is None:
            return None
        avcc = _avcc(self._init)
        return "avc1." + avcc[9:12].hex()

    def encode(self, frames: np.ndarray) -> bytes:
        """Encode one chunk; return its bytes at once (with the init segment first, on the first call).

        Args:
            frames: uint8 (F, H, W, 3) RGB, F >= 1, H x W = the encoder's size.

        Returns:
            Bytes to append to the stream: ``[ftyp moov] moof mdat [moof mdat ...]``.
            The chunk's first frame is an IDR keyframe.

        Raises:
            ValueError: wrong dtype/shape, or called after :meth:`close`.
        """
        if self._closed:
            raise ValueError("encoder is closed")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) \
                or frames.shape[0] < 1:
            raise ValueError(f"frames must be uint8 (F>=1, {self.height}, {self.width}, 3), "
                             f"got {frames.dtype} {frames.shape}")
        whole = self._encode_standalone(frames)
        boxes = _boxes(whole)
        init = b"".join(whole[b.start:b.end] for b in boxes if b.type in (b"ftyp", b"moov"))
        media = bytearray(b"".join(whole[b.start:b.end] for b in boxes if b.type in (b"moof", b"mdat")))
        head = b""
        if self._init is None:
            self._init, self._timescale = init, _timescale(init)
            if self._timescale % self.fps:
                raise RuntimeError(f"track timescale {self._timescale} is not a multiple of fps {self.fps}")
            head = init
        elif _avcc(init) != _avcc(self._init) or _timescale(init) != self._timescale:
            raise RuntimeError("libx264 produced a different codec configuration for a later chunk")
        self._restamp(media)
        self._decode_time += frames.shape[0] * self._timescale // self.fps
        self.frames_encoded += frames.shape[0]
        return head + bytes(media)

    def close(self) -> bytes:
        """Finish the stream. Every chunk was already flushed, so this returns ``b""``."""
        self._closed = True
        return b""

    def _encode_standalone(self, frames: np.ndarray) -> bytes:
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4", options={"movflags": _MOVFLAGS}) as out:
            stream = out.add_stream("libx264", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.options = dict(self._options)
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = i
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        return buf.getvalue()

    def _restamp(self, media: bytearray) -> None:
        """Renumber ``mfhd`` and shift ``tfdt`` of every fragment in ``media`` (in place)."""
        for moof in (b for b in _boxes(media) if b.type == b"moof"):
            self._sequence += 1
            for mfhd in _find(media, moof, [b"mfhd"]):
                struct.pack_into(">I", media, mfhd.body + 4, self._sequence)
            for tfdt in _find(media, moof, [b"traf", b"tfdt"]):
                if media[tfdt.body] == 1:
                    base = struct.unpack_from(">Q", media, tfdt.body + 4)[0]
                    struct.pack_into(">Q", media, tfdt.body + 4, base + self._decode_time)
                else:
                    base = struct.unpack_from(">I", media, tfdt.body + 4)[0] + self._decode_time
                    if base >= 2**32:
                        raise RuntimeError("stream too long for a version-0 tfdt box")
                    struct.pack_into(">I", media, tfdt.body + 4, base)


class RawFramesEncoder:
    """The raw output format: each chunk's frames as packed RGB bytes, no container.

    ``encode(frames)`` returns ``frames.tobytes()`` (C order: F, H, W, 3 uint8), so a
    client rebuilds a chunk with ``np.frombuffer(b, np.uint8).reshape(-1, H, W, 3)``.

    Args:
        width, height: frame size in pixels.
    """

    channels = 3

    def __init__(self, width: int, height: int):
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        self.width, self.height = width, height
        self.frames_encoded = 0

    @property
    def frame_bytes(self) -> int:
        """Bytes per frame (H * W * 3)."""
        return self.height * self.width * self.channels

    def encode(self, frames: np.ndarray) -> bytes:
        """uint8 (F, H, W, 3) -> F * H * W * 3 bytes.

        Raises:
            ValueError: wrong dtype or shape.
        """
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be uint8 (F, {self.height}, {self.width}, 3), got {frames.dtype} {frames.shape}")
        self.frames_encoded += frames.shape[0]
        return np.ascontiguousarray(frames).tobytes()

    def frames_in(self, data: bytes) -> int:
        """Number of frames in an ``encode`` result of ``len(data)`` bytes."""
        if len(data) % self.frame_bytes:
            raise ValueError(f"{len(data)} bytes is not a whole number of {self.width}x{self.height} RGB frames")
        return len(data) // self.frame_bytes

    def close(self) -> bytes:
        """Nothing is buffered: returns ``b""``."""
        return b""
