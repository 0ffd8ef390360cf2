"""Pixels <-> scaled latents as the MAGI-1 pipeline does them (reference ``inference/pipeline/video_process.py``).

* decode: ``decode_chunk`` / ``VaeHelper.decode``: latent / scale_factor -> tiled
  decode -> ``(x * 127.5 + 127.5).clamp(0, 255)`` truncated to uint8;
* encode_image (I2V) / encode_video (V2V prefix): ``encode_prefix_video`` /
  ``VaeHelper.encode``: ``u8 / 127.5 - 1`` -> tiled posterior-mode encode -> * scale_factor.

Tiles: the pipeline uses 256 x 256 px spatial tiles (overlap 0.25) and
``fps // 2`` frame temporal tiles (overlap 0) for the real VAE, whose training
frame is 256 px (``video_size``). We scale the spatial tile with the model:
default ``tile_size = cfg.video_size`` (256 for the real VAE, 32 px for
magi-tiny, so a 128 x 128 magi-tiny frame is decoded in 6 x 6 tiles).

Departure (documented): a temporal decode tile of one latent frame goes through
the reference's image path and yields 1 frame instead of ``patch_length``
(golden case ``decode_tiled_len4_quirk``); the codec always uses the video path,
so ``decode`` returns exactly ``4 T`` frames. Outputs are identical whenever the
reference's frame count is already ``4 T`` (e.g. chunk_width 6 with 3-frame tiles).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from stages.config import VaeConfig
from stages.errors import InvalidInput
from stages.vae.model import MagiVAE
from stages.vae.tiling import tiled_decode, to_uint8


class VaeCodec:
    """Chunk decode and prefix encode for one loaded VAE.

    Args:
        vae: the model (any device / dtype; inputs are moved to it).
        cfg: its configuration (must equal ``vae.cfg``).
        fps: video frame rate; the temporal tile is ``fps // 2`` frames by default.
        tile_size: spatial tile in pixels (default ``cfg.video_size``; reference 256).
        tile_length: temporal tile in frames (default ``fps // 2``; reference ``fps // 2``).
        spatial_overlap, temporal_overlap: overlap fractions (reference 0.25, 0).
        decode_backend: per-tile decode, latent tile (B, C, t, h, w) -> pixel tile
            (B, 3, t*pT, h*pH, w*pW) (e.g. from :func:`stages.vae.runtime.make_decode_backend`);
            default ``vae.decoder`` (eager PyTorch). Tiling and blending are the same for all.
    Raises:
        ValueError: naming the argument, for tiles that do not fit the patch grid.
    """

    def __init__(self, vae: MagiVAE, cfg: VaeConfig, fps: int = 24, *, tile_size: int | None = None,
                 tile_length: int | None = None, spatial_overlap: float = 0.25, temporal_overlap: float = 0.0,
                 decode_backend: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if cfg != vae.cfg:
            raise ValueError("cfg: differs from the configuration the VAE was built with")
        if fps < 2:
            raise ValueError(f"fps: must be at least 2, got {fps}")
        self.vae, self.cfg, self.fps = vae, cfg, fps
        self.decode_backend = decode_backend if decode_backend is not None else vae.decoder
        tile_size = cfg.video_size if tile_size is None else tile_size
        tile_length = fps // 2 if tile_length is None else tile_length
        _check_tile("tile_size", tile_size, spatial_overlap, cfg.patch_size)
        _check_tile("tile_length", tile_length, temporal_overlap, cfg.patch_length)
        self.tile_kwargs = dict(
            tile_sample_min_height=tile_size, tile_sample_min_width=tile_size,
            tile_sample_min_length=tile_length, spatial_tile_overlap_factor=spatial_overlap,
            temporal_tile_overlap_factor=temporal_overlap, allow_spatial_tiling=True,
        )

    @property
    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def decode(self, latent_scaled: torch.Tensor) -> np.ndarray:
        """Decode one latent chunk to frames (reference ``post_chunk_process``).

        Args:
            latent_scaled: (C=z_chans, T, h, w) float, DiT latent space (scaled).
        Returns:
            np.ndarray uint8 (F=T*patch_length, H=h*patch_size, W=w*patch_size, 3), RGB.
        Raises:
            ValueError: naming ``latent_scaled`` for a wrong type, rank, channel count or empty dim.
        """
        _check_latent(latent_scaled, self.cfg.z_chans)
        p = self._param
        z = (latent_scaled.float() / self.cfg.scale_factor).to(p.device, p.dtype)[None]
        with torch.no_grad():
            video = tiled_decode(z, self.decode_backend, spatial_factor=self.vae.spatial_downsample_factor,
                                 temporal_factor=self.vae.temporal_downsample_factor, **self.tile_kwargs)
        frames = to_uint8(video[0].float()).permute(1, 2, 3, 0)  # (3, F, H, W) -> (F, H, W, 3)
        return np.ascontiguousarray(frames.cpu().numpy())

    def encode_image(self, image: np.ndarray, field: str = "image") -> torch.Tensor:
        """Encode the I2V conditioning image (reference ``process_image``).

        Args:
            image: uint8 (H, W, 3) RGB; H and W multiples of patch_size.
            field: request field named in errors.
        Returns:
            float32 (C=z_chans, 1, h=H/8, w=W/8) scaled latent, on the VAE's device.
        Raises:
            InvalidInput(field): wrong type, dtype, rank or size.
        """
        _check_pixels(image, 3, field, self.cfg)
        return self._encode(torch.from_numpy(image)[None])

    def encode_video(self, frames: np.ndarray, field: str = "prefix_video") -> torch.Tensor:
        """Encode a V2V prefix video (reference ``process_prefix_video``).

        Args:
            frames: uint8 (F, H, W, 3) RGB; F a multiple of patch_length (4),
                H and W multiples of patch_size (8).
            field: request field named in errors.
        Returns:
            float32 (C=z_chans, F/4, h=H/8, w=W/8) scaled latent, on the VAE's device.
        Raises:
            InvalidInput(field): wrong type, dtype, rank or size.
        """
        _check_pixels(frames, 4, field, self.cfg)
        if frames.shape[0] % self.cfg.patch_length:
            raise InvalidInput(field, f"frame count {frames.shape[0]} is not a multiple of "
                                      f"{self.cfg.patch_length}")
        return self._encode(torch.from_numpy(np.ascontiguousarray(frames)))

    def _encode(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (C, t, h, w) float32 scaled latent."""
        p = self._param
        video = frames_u8.to(p.device).permute(3, 0, 1, 2)[None]  # (1, 3, F, H, W)
        video = (video / 127.5 - 1.0).to(p.dtype)
        with torch.no_grad():
            latent = self.vae.tiled_encode_3d(video, **self.tile_kwargs)
        return latent[0].float() * self.cfg.scale_factor


def _check_tile(name: str, tile: int, overlap: float, patch: int) -> None:
    if not 0 <= overlap < 1:
        raise ValueError(f"{name}: overlap must be in [0, 1), got {overlap}")
    if tile < patch or tile % patch:
        raise ValueError(f"{name}: {tile} is not a positive multiple of the VAE patch {patch}")
    if int(tile * (1 - overlap)) % patch or int(tile // patch * (1 - overlap)) < 1:
        raise ValueError(f"{name}: {tile} with overlap {overlap} gives a tile stride that is not "
                         f"a positive multiple of the VAE patch {patch}")


def _check_latent(latent: torch.Tensor, channels: int) -> None:
    if not isinstance(latent, torch.Tensor) or not latent.is_floating_point():
        raise ValueError(f"latent_scaled: expected a floating torch.Tensor, got {type(latent).__name__}"
                         + (f" {latent.dtype}" if isinstance(latent, torch.Tensor) else ""))
    if latent.dim() != 4 or latent.shape[0] != channels or min(latent.shape) < 1:
        raise ValueError(f"latent_scaled: expected shape (C={channels}, T, h, w) with T, h, w >= 1, "
                         f"got {tuple(latent.shape)}")


def _check_pixels(arr: np.ndarray, ndim: int, field: str, cfg: VaeConfig) -> None:
    layout = "(H, W, 3)" if ndim == 3 else "(F, H, W, 3)"
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise InvalidInput(field, f"expected a uint8 array {layout}, got {got}")
    if arr.ndim != ndim or arr.shape[-1] != 3 or min(arr.shape) < 1:
        raise InvalidInput(field, f"expected shape {layout} with RGB channels, got {arr.shape}")
    h, w = arr.shape[-3], arr.shape[-2]
    if h % cfg.patch_size or w % cfg.patch_size:
        raise InvalidInput(field, f"height and width must be multiples of {cfg.patch_size}, got {h}x{w}")
