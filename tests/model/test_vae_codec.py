"""VaeCodec on magi-tiny (128 x 128, 6-latent-frame chunks), tiling geometry and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.config import magi_tiny
from stages.errors import InvalidInput
from stages.vae.codec import VaeCodec
from stages.vae.tiling import blend, to_uint8


@pytest.fixture(scope="module")
def codec(tiny_vae, tiny_vae_cfg):
    return VaeCodec(tiny_vae, tiny_vae_cfg, fps=magi_tiny().sampling.fps)


def _video(frames=24, size=128, seed=0) -> np.ndarray:
    """Smooth moving gradients plus noise, uint8 (F, H, W, 3)."""
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(frames), np.arange(size), np.arange(size), indexing="ij")
    base = np.stack([x + 2 * t, y, (x + y) // 2 + t], axis=-1) * (255 / (2 * size))
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def test_round_trip_shapes_magi_tiny(codec):
    latent = codec.encode_video(_video())
    assert latent.shape == (16, 6, 16, 16) and latent.dtype == torch.float32
    assert torch.isfinite(latent).all()
    frames = codec.decode(latent)
    assert frames.shape == (24, 128, 128, 3) and frames.dtype == np.uint8
    image_latent = codec.encode_image(_video(frames=1)[0])
    assert image_latent.shape == (16, 1, 16, 16) and image_latent.dtype == torch.float32


def test_decode_chunk_is_uint8_non_degenerate_and_deterministic(codec):
    gen = torch.Generator().manual_seed(0)
    chunk = torch.randn(16, 6, 16, 16, generator=gen)
    frames = codec.decode(chunk)
    assert frames.shape == (24, 128, 128, 3) and frames.dtype == np.uint8 and frames.flags.c_contiguous
    assert frames.std() > 5 and len(np.unique(frames)) > 50
    assert np.array_equal(frames, codec.decode(chunk.clone()))


def test_decode_uses_scaled_tiles(codec, tiny_vae):
    """32 px tiles (stride 24 px) on 128 px frames: 6 x 6 spatial x 2 temporal (3-latent-frame) tiles."""
    shapes = []
    handle = tiny_vae.decoder.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape[2:])))
    try:
        codec.decode(torch.randn(16, 6, 16, 16))
    finally:
        handle.remove()
    assert len(shapes) == 72
    assert shapes[0] == (3, 4, 4) and shapes[-1] == (3, 1, 1)


def test_one_big_tile_equals_untiled_decode(tiny_vae, tiny_vae_cfg):
    chunk = torch.randn(16, 6, 16, 16, generator=torch.Generator().manual_seed(1))
    # one tile: 24 frames (6 latent), 256 px > frame
    codec = VaeCodec(tiny_vae, tiny_vae_cfg, fps=48, tile_size=256)
    with torch.no_grad():
        decoded = tiny_vae.decode(chunk[None] / tiny_vae_cfg.scale_factor)[0]
        reference = to_uint8(decoded).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(codec.decode(chunk), reference)


def test_decode_always_gives_four_frames_per_latent_frame(codec):
    """T = 4 with 3-latent-frame tiles leaves a 1-frame tile; the codec keeps 4 frames for it."""
    assert codec.decode(torch.randn(16, 4, 16, 16)).shape == (16, 128, 128, 3)
    assert codec.decode(torch.randn(16, 1, 8, 8)).shape == (4, 64, 64, 3)


def test_blend_matches_row_loop():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 2, 3, 8, 8, generator=gen), torch.randn(1, 2, 3, 5, 8, generator=gen)
    expected = b.clone()
    extent = 4
    for y in range(extent):
        expected[:, :, :, y] = a[:, :, :, -extent + y] * (1 - y / extent) + b[:, :, :, y] * (y / extent)
    assert torch.equal(blend(a, b, extent, dim=3), expected)
    assert torch.equal(blend(a, b, 0, dim=3), b)
    assert torch.equal(blend(a, b, 99, dim=3)[:, :, :, 0], a[:, :, :, -5])  # extent clipped to 5 rows


def test_decode_rejects_bad_latents(codec):
    with pytest.raises(ValueError, match="latent_scaled.*C=16"):
        codec.decode(torch.zeros(8, 6, 16, 16))
    with pytest.raises(ValueError, match="latent_scaled"):
        codec.decode(torch.zeros(1, 16, 6, 16, 16))
    with pytest.raises(ValueError, match="latent_scaled"):
        codec.decode(torch.zeros(16, 0, 16, 16))
    with pytest.raises(ValueError, match="latent_scaled.*floating"):
        codec.decode(torch.zeros(16, 6, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="latent_scaled"):
        codec.decode(np.zeros((16, 6, 16, 16), np.float32))


def test_encode_rejects_bad_pixels(codec):
    with pytest.raises(InvalidInput) as err:
        codec.encode_image(np.zeros((128, 128, 3), np.float32))
    assert err.value.field == "image" and "uint8" in str(err.value)
    with pytest.raises(InvalidInput, match="image.*RGB"):
        codec.encode_image(np.zeros((128, 128, 4), np.uint8))
    with pytest.raises(InvalidInput, match="image.*multiples of 8"):
        codec.encode_image(np.zeros((100, 128, 3), np.uint8))
    with pytest.raises(InvalidInput) as err:
        codec.encode_video(np.zeros((23, 128, 128, 3), np.uint8))
    assert err.value.field == "prefix_video" and "multiple of 4" in str(err.value)
    with pytest.raises(InvalidInput, match="prefix_video"):
        codec.encode_video(np.zeros((128, 128, 3), np.uint8))
    with pytest.raises(InvalidInput, match="clip"):
        codec.encode_video(np.zeros((4, 64, 60, 3), np.uint8), field="clip")


def test_codec_rejects_bad_settings(tiny_vae, tiny_vae_cfg):
    with pytest.raises(ValueError, match="tile_size"):
        VaeCodec(tiny_vae, tiny_vae_cfg, tile_size=36)
    with pytest.raises(ValueError, match="tile_size"):
        VaeCodec(tiny_vae, tiny_vae_cfg, tile_size=8)  # stride int(8 * 0.75) = 6 px is not a whole patch
    with pytest.raises(ValueError, match="tile_length"):
        VaeCodec(tiny_vae, tiny_vae_cfg, fps=30)  # fps // 2 = 15 frames is not a whole number of latent frames
    with pytest.raises(ValueError, match="tile_size: overlap"):
        VaeCodec(tiny_vae, tiny_vae_cfg, spatial_overlap=1.0)
    with pytest.raises(ValueError, match="cfg"):
        VaeCodec(tiny_vae, tiny_vae_cfg.model_copy(update={"scale_factor": 1.0}))
