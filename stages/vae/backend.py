"""What every per-tile VAE decode backend shares: the interface, the error saying one cannot
run here, input checks and the output shape (:mod:`stages.vae.runtime` picks a backend,
:mod:`stages.vae.trt` is the TensorRT one)."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from stages.config import VaeConfig
from stages.vae.export import TileShape

TRT_DTYPES = ("fp16", "bf16", "fp32")


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (missing module, no device); the message says why."""


class DecodeBackend(Protocol):
    """Per-tile decode: latent tile (B, C, t, h, w) -> pixel tile (B, 3, t*pT, h*pH, w*pW).

    Attributes:
        name: ``"tensorrt"``, ``"onnxruntime"`` or ``"torch"``.
        skipped: backends tried before this one, mapped to why they were skipped
            (filled in by :func:`stages.vae.runtime.make_decode_backend`).
    """

    name: str
    skipped: dict[str, str]

    def __call__(self, z: torch.Tensor) -> torch.Tensor: ...

    def prepare(self, tile_shapes: Sequence[TileShape]) -> None:
        """Export / build / load whatever the given latent tile shapes need, ahead of the first decode."""


def tile_output_shape(cfg: VaeConfig, shape: Sequence[int], batch: int = 1) -> tuple[int, int, int, int, int]:
    """Pixel tile shape (B, 3, t*pT, h*pH, w*pW) of ``batch`` latent tiles (t, h, w)."""
    t, h, w = shape
    return (batch, 3, t * cfg.patch_length, h * cfg.patch_size, w * cfg.patch_size)


def check_tile_input(z: torch.Tensor, cfg: VaeConfig) -> None:
    """Raises ValueError naming ``z`` unless it is a (B, C=z_chans, t, h, w) tensor."""
    if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != cfg.z_chans:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z: expected a latent tile (B, C={cfg.z_chans}, t, h, w), got {got}")
