"""decode_image on the real photos and every file of the fuzz corpus (shared/inputs, see its READMEs)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from stages.errors import InvalidInput
from stages.video import decode_image
from tests import shared_data

INPUTS = shared_data.inputs_dir()
BAD, IMAGES = INPUTS / "bad", INPUTS / "images"
needs_inputs = shared_data.skip_unless(BAD / "README.md", "shared inputs")
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

# files of bad/ that are usable images (bad/README.md: "accept" or "accept-or-reject");
# every other file there, prompts and blns included, must be rejected with InvalidInput
ACCEPTED = {
    "animated_chelsea_10f.gif", "cmyk_rocket.jpg", "corrupted_middle.jpg", "exif_orientation_6.jpg",
    "extreme_aspect_4000x16.png", "gray16_coffee_300x200.png", "jpeg_named.mp4", "one_pixel_1x1.png",
    "rgba_half_transparent.png",
}
REAL = ["skimage/astronaut.png", "skimage/chelsea.png", "skimage/coffee.png", "skimage/rocket.jpg",
        "MAGI-1/example/assets/image.jpeg"]


def _bad_files() -> list[str]:
    if not BAD.exists():
        return []
    return sorted(str(p.relative_to(BAD)) for p in BAD.rglob("*") if p.is_file())


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _native(path: Path, **kw) -> np.ndarray:
    """Decode at the file's own (oriented) size with no geometry change."""
    with Image.open(path) as im:
        w, h = ImageOps.exif_transpose(im).size
    return decode_image(_read(path), height=h, width=w, aspect_policy="fit", **kw)


@needs_inputs
@pytest.mark.parametrize("name", _bad_files())
def test_every_bad_file_is_decoded_or_rejected_cleanly(name):
    data = _read(BAD / name)
    if name in ACCEPTED:
        out = decode_image(data, height=96, width=160)
        assert out.shape == (96, 160, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    else:
        with pytest.raises(InvalidInput) as err:
            decode_image(data, height=96, width=160, field="image")
        assert err.value.field == "image" and str(err.value).startswith("image: ")


@needs_inputs
@pytest.mark.parametrize(("name", "dims"), [
    ("huge_dims_2147483647x2147483647.png", "2147483647x2147483647"),
    ("huge_dims_65535x65535.png", "65535x65535"),
    ("huge_dims_12000x12000.png", "12000x12000"),
    ("bomb_12000x12000_1bit.png", "12000x12000"),
])
def test_huge_declared_dims_rejected_naming_field_and_dims(name, dims):
    with pytest.raises(InvalidInput, match=dims) as err:
        decode_image(_read(BAD / name), height=64, width=64, field="image")
    assert err.value.field == "image"


@needs_inputs
@pytest.mark.parametrize(("name", "needle"), [
    ("zero_bytes.png", "empty"), ("truncated_100B.png", "header"), ("truncated_half.jpg", "truncated"),
    ("text_file_named.png", "not an image"), ("bad_ihdr_crc.png", "not an image"),
])
def test_rejection_messages(name, needle):
    with pytest.raises(InvalidInput, match=needle):
        decode_image(_read(BAD / name), height=64, width=64)


@needs_inputs
@pytest.mark.parametrize("rel", REAL)
@pytest.mark.parametrize(("h", "w"), [(128, 128), (96, 160), (721, 33)])
@pytest.mark.parametrize("policy", ["crop", "pad", "fit"])
def test_real_images_all_sizes_and_policies(rel, h, w, policy):
    out = decode_image(_read(IMAGES / rel), height=h, width=w, aspect_policy=policy)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert out.std() > 5  # a real picture, not a flat fill


@needs_inputs
def test_exif_orientation_is_applied():
    rotated = _native(BAD / "exif_orientation_6.jpg")
    upright = _native(IMAGES / "skimage" / "rocket.jpg")
    assert rotated.shape == (640, 427, 3)  # stored 640x427 landscape, shown as portrait
    expected = np.rot90(upright, k=-1)  # orientation 6 = rotate 90 degrees clockwise to display
    assert np.abs(rotated.astype(int) - expected.astype(int)).mean() < 3


@needs_inputs
def test_cmyk_jpeg_converts_to_the_right_colours():
    cmyk = _native(BAD / "cmyk_rocket.jpg")
    rgb = _native(IMAGES / "skimage" / "rocket.jpg")
    assert np.abs(cmyk.astype(int) - rgb.astype(int)).mean() < 3


@needs_inputs
def test_gray16_is_scaled_not_clipped():
    out = _native(BAD / "gray16_coffee_300x200.png")
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    with Image.open(BAD / "gray16_coffee_300x200.png") as im:
        raw16 = np.asarray(im).astype(np.float64)
    np.testing.assert_array_equal(out[..., 0], np.rint(raw16 / 257).astype(np.uint8))
    assert out.min() < 40 and out.max() > 200  # full range kept (a naive cast would clip to 255)


@needs_inputs
@pytest.mark.parametrize(("background", "value"), [((255, 255, 255), 255), ((0, 0, 0), 0)])
def test_rgba_transparent_pixels_show_the_background(background, value):
    out = _native(BAD / "rgba_half_transparent.png", background=background)
    chelsea = _native(IMAGES / "skimage" / "chelsea.png")
    half = out.shape[1] // 2
    assert (out[:, : half - 1] == value).all()
    np.testing.assert_array_equal(out[:, half + 1:], chelsea[:, half + 1:])


@needs_inputs
def test_animated_gif_uses_first_frame():
    path = BAD / "animated_chelsea_10f.gif"
    with Image.open(path) as im:
        first = np.asarray(im.convert("RGB"))
    out = _native(path)
    assert out.shape == first.shape and (out == first).all()


@needs_inputs
def test_one_pixel_upscales_to_a_flat_image():
    out = decode_image(_read(BAD / "one_pixel_1x1.png"), height=32, width=48)
    with Image.open(BAD / "one_pixel_1x1.png") as im:
        colour = np.asarray(im.convert("RGB"))[0, 0]
    assert (out == colour).all()


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _bands() -> np.ndarray:
    """200 x 100 (W x H): red | green (middle half) | blue, by columns."""
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :50, 0] = 255
    img[:, 50:150, 1] = 255
    img[:, 150:, 2] = 255
    return img


def test_crop_policy_keeps_aspect_and_centre():
    out = decode_image(_png(_bands()), height=64, width=64, aspect_policy="crop")
    assert (out[:, 2:-2, 1] > 250).all() and (out[:, 2:-2, [0, 2]] < 5).all()


def test_pad_policy_letterboxes_in_black():
    out = decode_image(_png(_bands()), height=64, width=64, aspect_policy="pad")
    assert (out[:16] == 0).all() and (out[48:] == 0).all()
    assert (out[20:44, 2:14, 0] > 250).all() and (out[20:44, 20:44, 1] > 250).all()


def test_fit_policy_stretches():
    out = decode_image(_png(_bands()), height=64, width=64, aspect_policy="fit")
    assert (out[:, :14, 0] > 250).all() and (out[:, 18:46, 1] > 250).all() and (out[:, 50:, 2] > 250).all()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"])
def test_allowed_formats_decode(fmt):
    out = decode_image(_png(_bands(), fmt), height=50, width=100, aspect_policy="fit")
    assert out.shape == (50, 100, 3)
    assert out[:, 40:60, 1].mean() > 200


def test_other_formats_are_rejected():
    with pytest.raises(InvalidInput, match="supported format"):
        decode_image(_png(_bands()[:64, :64], "ICO"), height=32, width=32)


def test_limits_are_parameters():
    data = _png(_bands())
    with pytest.raises(InvalidInput, match="200x100"):
        decode_image(data, height=8, width=8, max_pixels=10_000)
    with pytest.raises(InvalidInput, match="bytes"):
        decode_image(data, height=8, width=8, max_bytes=100)


def test_caller_errors_are_value_errors():
    with pytest.raises(ValueError):
        decode_image(_png(_bands()), height=0, width=8)
    with pytest.raises(ValueError):
        decode_image(_png(_bands()), height=8, width=8, aspect_policy="zoom")


@needs_inputs
@pytest.mark.parametrize("name", sorted(p.name for p in BAD.iterdir() if p.is_file()) if BAD.exists() else [])
def test_every_bad_file_as_image_is_rejected_in_words_or_decoded(name):
    """No decoder internals ("OSError", "Errno", paths) reach the message."""
    try:
        decode_image(_read(BAD / name), height=32, width=32)
    except InvalidInput as err:
        assert err.field == "image"
        assert not any(bad in err.reason for bad in ("Error", "Errno", "Traceback", "/")), err.reason
