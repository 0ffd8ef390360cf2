"""MAGI-1 transformer VAE (reference ``ViTVAE``, ``model_type="vit"``).

Compression: ``patch_size`` (8) spatially and ``patch_length`` (4) temporally,
``z_chans`` (16) latent channels. Pixel values are floats in [-1, 1]
(``u8 / 127.5 - 1``); the DiT works on *scaled* latents ``mean * scale_factor``
(reference ``encode_prefix_video`` / ``decode_chunk``).
"""

from __future__ import annotations

import torch
from torch import nn

from stages.config import VaeConfig
from stages.vae import tiling
from stages.vae.modules import VaeDecoder, VaeEncoder


class MagiVAE(nn.Module):
    """Encoder + decoder with the reference ``ViTVAE`` state_dict layout (``encoder.*``, ``decoder.*``).

    Args:
        cfg: the reference ``ddconfig`` plus ``scale_factor``.
    Raises:
        ValueError: an unsupported setting (``use_rope``; ``conv_last_layer=False``).
    """

    def __init__(self, cfg: VaeConfig):
        super().__init__()
        if cfg.use_rope:
            raise ValueError("VaeConfig.use_rope: the rope attention path of the reference VAE is not supported")
        self.cfg = cfg
        self.encoder = VaeEncoder(cfg)
        self.decoder = VaeDecoder(cfg)

    @property
    def spatial_downsample_factor(self) -> int:
        """Pixels per latent cell along H and W (``patch_size``)."""
        return self.cfg.patch_size

    @property
    def temporal_downsample_factor(self) -> int:
        """Video frames per latent frame (``patch_length``)."""
        return self.cfg.patch_length

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder output.

        Args:
            x: (B, 3, T, H, W) float video in [-1, 1]; T, H, W multiples of the patch.
        Returns:
            (B, 2*z_chans, T/pT, H/pH, W/pW) moments ``[mean | logvar]`` along channels.
        """
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mode (mean) of the latent (reference ``VaeHelper.patch_vae_encode``).

        A single frame (T == 1, image) is expanded to ``patch_length`` frames and the
        first latent frame is kept (the reference hard-codes 4 = patch_length).

        Args:
            x: (B, 3, T, H, W) float video in [-1, 1].
        Returns:
            (B, z_chans, T', h, w) unscaled latent, T' = 1 if T == 1 else T / pT; x's dtype.
        """
        single = x.shape[2] == 1
        if single:
            x = x.expand(-1, -1, self.cfg.patch_length, -1, -1)
        moments = self.encoder(x)
        mean = moments[:, : self.cfg.z_chans] if self.cfg.double_z else moments
        if single:
            mean = mean[:, :, :1]
        return mean.to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode an unscaled latent (reference ``ViTVAE.decode``).

        A one-frame latent (T == 1) takes the image path: it is decoded to
        ``patch_length`` frames and only the first is kept.

        Args:
            z: (B, z_chans, T, h, w) unscaled latent (scaled latent / scale_factor).
        Returns:
            (B, 3, 1 if T == 1 else T*pT, h*pH, w*pW) float video, nominally in [-1, 1].
        """
        out = self.decoder(z)
        if z.shape[2] == 1:
            out = out[:, :, :1]
        return out

    def tiled_encode_3d(self, x: torch.Tensor, **tile_kwargs) -> torch.Tensor:
        """Tiled posterior-mode encode (reference ``ViTVAE.tiled_encode_3d`` with the patched ``encode``).

        Args:
            x: (B, 3, T, H, W) float video in [-1, 1].
            **tile_kwargs: see :func:`stages.vae.tiling.tiled_encode` (reference names:
                ``tile_sample_min_height/width/length``, ``spatial_tile_overlap_factor``,
                ``temporal_tile_overlap_factor``, ``allow_spatial_tiling``).
        Returns:
            (B, z_chans, t, h, w) unscaled latent.
        """
        return tiling.tiled_encode(
            x, self.encode, spatial_factor=self.spatial_downsample_factor,
            temporal_factor=self.temporal_downsample_factor, **tile_kwargs,
        )

    def tiled_decode_3d(self, z: torch.Tensor, *, single_frame_image_path: bool = True,
                        **tile_kwargs) -> torch.Tensor:
        """Tiled decode (reference ``ViTVAE.tiled_decode_3d``).

        Args:
            z: (B, z_chans, T, h, w) unscaled latent.
            single_frame_image_path: True (reference) decodes a 1-latent-frame temporal
                tile through :meth:`decode`'s image path (1 pixel frame instead of pT);
                False always uses the video path, so the output has T*pT frames.
            **tile_kwargs: see :func:`stages.vae.tiling.tiled_decode`.
        Returns:
            (B, 3, F, H, W) float video; F = T*pT unless the quirk above applies.
        """
        decode_fn = self.decode if single_frame_image_path else self.decoder
        return tiling.tiled_decode(
            z, decode_fn, spatial_factor=self.spatial_downsample_factor,
            temporal_factor=self.temporal_downsample_factor, **tile_kwargs,
        )
