"""``VaeDecoder`` deployment: a thin Ray Serve shim over :class:`stages.vae.codec.VaeCodec`."""

from __future__ import annotations

from ray import serve

from cluster.config import ServiceConfig
from cluster.engine.compute import ComputeThread
from cluster.serve.compute import prepare_replica


@serve.deployment(name="VaeDecoder")
class VaeDecoderDeployment:
    """Latent chunk -> uint8 frames, and conditioning media -> scaled latents."""

    def __init__(self, cfg: ServiceConfig):
        from stages.vae.codec import VaeCodec  # noqa: PLC0415
        from stages.vae.weights import load_vae  # noqa: PLC0415

        model, paths = prepare_replica(cfg, cfg.deployments.vae_decoder)
        self._codec = VaeCodec(load_vae(paths.vae, model.vae), model.vae, fps=model.sampling.fps)
        self._compute = ComputeThread("vae")

    async def decode(self, latent, job_id: str | None = None):
        """Scaled latent float32 (C, T, h, w) -> uint8 frames (F=4T, H=8h, W=8w, 3).

        ``job_id`` only tags the call in :meth:`decode_intervals`.
        """
        return await self._compute.call(self._codec.decode, latent, tag=job_id)

    def decode_intervals(self, job_id: str) -> list[tuple[float, float]]:
        """Wall-clock (start, end) ``time.time()`` of the job's recent decodes, in call order."""
        return self._compute.intervals(job_id)

    async def encode_image(self, image):
        """I2V: uint8 image (H, W, 3) -> scaled latent float32 (C, 1, h, w)."""
        return await self._compute.call(self._codec.encode_image, image)

    async def encode_video(self, frames):
        """V2V: uint8 prefix frames (F, H, W, 3) -> scaled latent float32 (C, F/4, h, w)."""
        return await self._compute.call(self._codec.encode_video, frames)
