"""``TextEncoder`` deployment: a thin Ray Serve shim over :class:`stages.text_encoder.T5TextEncoder`."""

from __future__ import annotations

from typing import Sequence

from ray import serve

from cluster.config import ServiceConfig
from cluster.messages import CaptionEmbedding
from cluster.engine.compute import ComputeThread
from cluster.serve.compute import prepare_replica


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    """T5 caption embeddings (the stage caches them by prompt)."""

    def __init__(self, cfg: ServiceConfig):
        from stages.text_encoder import T5TextEncoder  # noqa: PLC0415

        model, paths = prepare_replica(cfg, cfg.deployments.text_encoder)
        self._encoder = T5TextEncoder(paths.text_encoder, model.text_encoder)
        self._compute = ComputeThread("t5")

    async def encode(self, prompts: Sequence[str]) -> list[CaptionEmbedding]:
        """One :class:`CaptionEmbedding` per prompt: float32 (L, D) embedding, int64 (L,) mask."""
        pairs = await self._compute.call(self._encoder.encode, list(prompts))
        return [CaptionEmbedding(embedding=emb, mask=mask) for emb, mask in pairs]
