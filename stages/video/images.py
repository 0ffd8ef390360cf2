"""Untrusted image bytes -> validated RGB uint8 array at the model's resolution (I2V input).

Order of checks (``decode_image``): size of the upload; format sniffed from the
content (never the file name or content type) among :data:`ALLOWED_FORMATS`;
declared pixel dimensions against the limits *before* any pixel data is decoded
(a 45-byte PNG can declare 2^31 x 2^31 pixels, a 17 KB PNG can inflate to 432 MB);
then the full decode, which must not be truncated or corrupt. Every failure is an
:class:`~stages.errors.InvalidInput` naming the request field.

Conversions, documented choices:
- EXIF orientation is applied (phone photos), via ``ImageOps.exif_transpose``;
  an unreadable EXIF block is ignored rather than rejected.
- Animated images (GIF, APNG, WebP): the first frame is used.
- Transparency (RGBA, LA, PA, palette or grey with a transparent colour) is
  composited over an opaque background, white by default (``background``),
  the way such images look on an ordinary page.
- 16-bit and 32-bit integer grey (``I;16*``, ``I``) is scaled by 255/65535 with
  rounding; float grey (``F``) is clipped to [0, 255]; CMYK, YCbCr, 1-bit, grey
  and palette images are converted to RGB by Pillow. Embedded ICC profiles are
  ignored (as the reference's ffmpeg path does).
- Geometry (``aspect_policy``): ``"crop"`` (default) scales to cover H x W keeping
  the aspect ratio and centre-crops, i.e. the reference ``ffmpeg_i2v``
  ``aspect_policy="crop"`` (scale ``force_original_aspect_ratio=increase`` + crop);
  ``"pad"`` fits inside and pads with black (reference ``"pad"``); ``"fit"``
  stretches (the reference default). Resampling is bicubic, as ffmpeg's ``scale``.
"""

from __future__ import annotations

import io
import struct
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.errors import InvalidInput

AspectPolicy = Literal["crop", "pad", "fit"]

#: Pillow decoders accepted (content sniffing is limited to these; JPEG includes MPO).
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
#: Largest upload accepted, bytes.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: Largest declared image accepted, pixels (W x H); 8K UHD is 33.2 Mpx.
MAX_IMAGE_PIXELS = 40_000_000
#: Longest side accepted, pixels.
MAX_IMAGE_SIDE = 16384
Image.init()  # register every plugin, so that ALLOWED_FORMATS all resolve
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _declared_png_size(data: bytes) -> tuple[int, int] | None:
    """(W, H) from a PNG IHDR chunk, without decoding (PNG spec section 11.2.2)."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def check_payload(data: bytes, *, field: str, max_bytes: int) -> bytes:
    """Return ``data`` as bytes after checking it is neither empty nor over ``max_bytes``.

    Raises:
        InvalidInput: empty, or larger than ``max_bytes`` (message names ``field``).
    """
    data = bytes(data)
    if not data:
        raise InvalidInput(field, "is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidInput(field, f"is {len(data)} bytes, above the limit of {max_bytes}")
    return data


def check_dimensions(width: int, height: int, *, field: str, max_pixels: int = MAX_IMAGE_PIXELS,
                     max_side: int = MAX_IMAGE_SIDE) -> None:
    """Reject declared frame dimensions before any pixel is decoded.

    Raises:
        InvalidInput: a side is < 1 or > ``max_side``, or W x H > ``max_pixels``;
            the message gives the dimensions.
    """
    if width < 1 or height < 1:
        raise InvalidInput(field, f"declared size {width}x{height} has an empty side")
    if max(width, height) > max_side or width * height > max_pixels:
        raise InvalidInput(
            field, f"declared size {width}x{height} ({width * height} pixels) exceeds the limit "
            f"({max_pixels} pixels, {max_side} per side)")


def _open(data: bytes, field: str) -> Image.Image:
    """Sniff and parse the header only (no pixel data)."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        size = _declared_png_size(data)
        if size is not None:
            check_dimensions(*size, field=field)
        raise InvalidInput(field, "declares an image too large to decode") from exc
    except UnidentifiedImageError:
        raise InvalidInput(field, f"is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is bad input
        raise InvalidInput(field, "has an unreadable or damaged image header") from exc


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB (see the module docstring for each case)."""
    if im.mode in _WIDE_GREY:
        grey = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.rint(grey * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        canvas = Image.new("RGBA", im.size, (*background, 255))
        im = Image.alpha_composite(canvas, im.convert("RGBA"))
    return im.convert("RGB")


def fit_image(im: Image.Image, height: int, width: int, aspect_policy: AspectPolicy = "crop") -> Image.Image:
    """Resize an RGB image to exactly (W, H) by ``aspect_policy`` (see module docstring).

    For ``"crop"`` the centred source box of the target aspect ratio is resampled
    directly, so no oversized intermediate is made (a 4000 x 16 strip costs the
    same as its 16 x 16 centre).
    """
    w, h = im.size
    if aspect_policy == "fit":
        return im.resize((width, height), Image.Resampling.BICUBIC)
    if aspect_policy == "crop":
        if w * height > h * width:  # wider than the target
            crop_w = h * width / height
            box = ((w - crop_w) / 2, 0.0, (w + crop_w) / 2, float(h))
        else:
            crop_h = w * height / width
            box = (0.0, (h - crop_h) / 2, float(w), (h + crop_h) / 2)
        return im.resize((width, height), Image.Resampling.BICUBIC, box=box)
    if aspect_policy == "pad":
        scale = min(width / w, height / h)
        inner = (max(1, round(w * scale)), max(1, round(h * scale)))
        canvas = Image.new("RGB", (width, height), (0, 0, 0))
        canvas.paste(im.resize(inner, Image.Resampling.BICUBIC), ((width - inner[0]) // 2, (height - inner[1]) // 2))
        return canvas
    raise ValueError(f"unknown aspect_policy {aspect_policy!r}; use 'crop', 'pad' or 'fit'")


def decode_image(data: bytes, *, height: int, width: int, field: str = "image",
                 aspect_policy: AspectPolicy = "crop", background: tuple[int, int, int] = (255, 255, 255),
                 max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode and validate an uploaded image for image-to-video.

    Args:
        data: the file's bytes (any of :data:`ALLOWED_FORMATS`, sniffed from content).
        height, width: output size H, W in pixels.
        field: request field named in errors.
        aspect_policy: ``"crop"`` | ``"pad"`` | ``"fit"`` (module docstring).
        background: RGB that transparent pixels are composited over.
        max_bytes, max_pixels: upload and declared-size limits.

    Returns:
        uint8 (H, W, 3) RGB, C-contiguous, writable.

    Raises:
        InvalidInput: empty, too large, not a supported image, declared size over
            the limits, truncated or corrupt pixel data, unsupported colour mode.
        ValueError: ``height``/``width`` < 1 or unknown ``aspect_policy`` (caller bugs).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")
    if aspect_policy not in ("crop", "pad", "fit"):
        raise ValueError(f"unknown aspect_policy {aspect_policy!r}; use 'crop', 'pad' or 'fit'")
    data = check_payload(data, field=field, max_bytes=max_bytes)
    with _open(data, field) as im:
        check_dimensions(*im.size, field=field, max_pixels=max_pixels)
        try:
            im.seek(0)  # animated: first frame
            im.load()
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data raises many types
            raise InvalidInput(field, f"holds truncated or corrupt {im.format} data") from exc
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
            oriented = im
        try:
            rgb = _to_rgb(oriented, background)
        except (ValueError, OSError) as exc:
            raise InvalidInput(field, f"uses an unsupported colour mode ({oriented.mode})") from exc
        return np.array(fit_image(rgb, height, width, aspect_policy), dtype=np.uint8)
