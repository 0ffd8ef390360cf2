"""MagiVAE against every case of the reference golden data (golden_vae.*): every tiled case runs with
the case's kwargs; a case no test knows fails ``test_every_golden_case_is_covered``."""

from __future__ import annotations

import pytest
import torch

from stages.vae import MagiVAE
from stages.vae.codec import VaeCodec
from stages.vae.tiling import to_uint8
from stages.vae.weights import load_vae
from tests.model.vae_fixtures import (
    assert_close_float, assert_close_uint8, golden_cases, golden_kwargs, golden_path, golden_tensors, golden_vae_config,
    golden_video,
)

COVERED = {"encode_tiled", "encode_image", "decode_tiled", "decode_tiled_len4_quirk"}  # the tests below


def test_every_golden_case_is_covered():
    assert set(golden_cases()) <= COVERED, f"golden_vae.json cases without a test: {set(golden_cases()) - COVERED}"


@pytest.fixture(scope="module")
def vae() -> MagiVAE:
    return load_vae(golden_path("tiny_vae.safetensors"), golden_vae_config())


@pytest.fixture(scope="module")
def latent_in() -> torch.Tensor:
    return golden_tensors()["decode/latent_scaled_in"]


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """'b c t h w -> (b t) c h w'."""
    return video.permute(0, 2, 1, 3, 4).flatten(0, 1)


@torch.no_grad()
def test_encode_full(vae):
    video = golden_video()
    assert_close_float(vae.encode_moments(video), "encode_full/moments")
    mode = vae.encode(video)
    assert_close_float(mode, "encode_full/latent_mode")
    assert_close_float(mode * vae.cfg.scale_factor, "encode_full/latent_scaled")


@torch.no_grad()
def test_encode_tiled_blends_in_place(vae):
    latent = vae.tiled_encode_3d(golden_video(), **golden_kwargs("encode_tiled"))
    assert_close_float(latent, "encode_tiled/latent_mode")
    assert_close_float(latent * vae.cfg.scale_factor, "encode_tiled/latent_scaled")


@torch.no_grad()
def test_encode_image(vae):
    image = golden_video()[:, :, :1]
    tiled = vae.tiled_encode_3d(image, **golden_kwargs("encode_image"))
    assert_close_float(tiled * vae.cfg.scale_factor, "encode_image/latent_scaled")
    assert_close_float(vae.encode(image), "encode_image/latent_mode_untiled")


@torch.no_grad()
def test_decode_full(vae, latent_in):
    assert_close_float(vae.decode(latent_in / vae.cfg.scale_factor), "decode_full/video")


@torch.no_grad()
def test_decode_single_frame_takes_image_path(vae, latent_in):
    assert_close_float(vae.decode(latent_in[:, :, :1] / vae.cfg.scale_factor), "decode_single_frame/video")


@torch.no_grad()
def test_decode_tiled(vae, latent_in):
    video = vae.tiled_decode_3d(latent_in / vae.cfg.scale_factor, **golden_kwargs("decode_tiled"))
    frames = to_frames(video)
    assert_close_float(frames, "decode_tiled/frames")
    assert_close_uint8(to_uint8(frames), golden_tensors()["decode_tiled/frames_u8"], "decode_tiled/frames_u8")


@torch.no_grad()
def test_decode_tiled_len4_quirk(vae, latent_in):
    n = golden_tensors()["decode_tiled_len4_quirk/frames"].shape[0]  # one pixel frame per 1-latent-frame tile
    video = vae.tiled_decode_3d(latent_in[:, :, :n] / vae.cfg.scale_factor, **golden_kwargs("decode_tiled_len4_quirk"))
    assert_close_float(to_frames(video), "decode_tiled_len4_quirk/frames")


def test_to_uint8_truncates():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999 / 127.5, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 127, 128, 255, 255]


def test_codec_matches_pipeline_decode_and_encode(vae, latent_in):
    """VaeCodec with the golden's tiles and fps (tile_sample_min_length = fps // 2) = the reference pipeline calls."""
    kw = golden_kwargs("decode_tiled")
    assert kw["tile_sample_min_height"] == kw["tile_sample_min_width"] == golden_kwargs("encode_tiled")["tile_sample_min_height"]
    codec = VaeCodec(vae, vae.cfg, fps=2 * kw["tile_sample_min_length"], tile_size=kw["tile_sample_min_height"])
    frames = codec.decode(latent_in[0])
    expected = golden_tensors()["decode_tiled/frames_u8"].permute(0, 2, 3, 1)
    assert_close_uint8(torch.from_numpy(frames), expected, "codec.decode")
    video_u8 = golden_tensors()["video_u8"][0].permute(1, 2, 3, 0).numpy()  # (F, H, W, 3)
    assert_close_float(codec.encode_video(video_u8)[None], "encode_tiled/latent_scaled")
    assert_close_float(codec.encode_image(video_u8[0])[None], "encode_image/latent_scaled")
