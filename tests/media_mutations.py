"""Damaged variants of a real MP4, made by editing its boxes (ISO/IEC 14496-12) in place.

Used by the decode unit tests and the API fuzz test. Offsets are found by walking the
file's box tree, never hard-coded, so any MP4 with one video track works.
"""

from __future__ import annotations

import struct

_CONTAINERS = (b"moov", b"trak", b"mdia", b"minf", b"stbl")


def find_box(data: bytes, path: tuple[bytes, ...], start: int = 0, end: int | None = None) -> tuple[int, int]:
    """(offset, size) of the first box at ``path`` (e.g. (b"moov", b"trak", b"tkhd")).

    ``stsd`` is entered past its 8-byte full-box header + entry count, so a sample
    entry (``avc1``) can be the last element. Raises KeyError if absent.
    """
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if size < 8:
            break
        if kind == path[0]:
            if len(path) == 1:
                return offset, size
            skip = 16 if kind == b"stsd" else 8
            return find_box(data, path[1:], offset + skip, offset + size)
        offset += size
    raise KeyError(b"/".join(path).decode())


def _put(data: bytes, offset: int, patch: bytes) -> bytes:
    return data[:offset] + patch + data[offset + len(patch):]


def mp4_mutations(data: bytes) -> dict[str, bytes]:
    """Named damaged copies of ``data`` (an MP4 whose video track's sample entry is ``avc1``).

    - ``fourcc``: the sample entry's codec tag ``avc1`` -> ``zzzz`` (no decoder);
    - ``truncated_moov``: the file cut in the middle of its ``moov`` box;
    - ``zero_size_track``: the ``trak`` box's size field set to 0 ("extends to the end");
    - ``zero_dims``: width/height 0 in the sample entry and the track header;
    - ``huge_dims``: 65535 x 65535 in the sample entry and the track header;
    - ``no_samples``: only the boxes before the first ``moof``/``mdat`` (a track without samples).
    """
    trak, _ = find_box(data, (b"moov", b"trak"))
    entry, _ = find_box(data, (*_CONTAINERS, b"stsd", b"avc1"))
    tkhd, tkhd_size = find_box(data, (b"moov", b"trak", b"tkhd"))
    moov, moov_size = find_box(data, (b"moov",))
    dims_at = entry + 32  # sample entry: 8 header + 6 reserved + 2 index + 16 pre-defined
    tkhd_dims_at = tkhd + tkhd_size - 8  # 16.16 fixed-point width, height end the box
    first_media = min(i for i in (data.find(b"moof"), data.find(b"mdat")) if i > 0) - 4

    def dims(w: int, h: int) -> bytes:
        return _put(_put(data, dims_at, struct.pack(">HH", w, h)), tkhd_dims_at, struct.pack(">II", w << 16, h << 16))

    return {
        "fourcc": _put(data, entry + 4, b"zzzz"),
        "truncated_moov": data[: moov + moov_size // 2],
        "zero_size_track": _put(data, trak, struct.pack(">I", 0)),
        "zero_dims": dims(0, 0),
        "huge_dims": dims(65535, 65535),
        "no_samples": data[:first_media],
    }
