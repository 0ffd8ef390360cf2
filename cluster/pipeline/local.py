"""The stages in this process (no Ray): the in-process adapter of :class:`cluster.pipeline.Pipeline`.

    async with LocalPipeline(cfg) as local:           # loads T5, the VAE and the DiT (magi-tiny: seconds)
        async for message in local.generate(request):  # pb.GenerateRequest -> pb.GenerateResponse ...
            ...

T5 and the VAE each run in their own :class:`cluster.engine.compute.ComputeThread` and the
DiT in an :class:`cluster.engine.AsyncEngine` (its own compute thread), as in the served
replicas, so the decode of chunk k overlaps the DiT's work on chunk k+1 here too. The engine is
sized like a DiTEngine replica's (:func:`cluster.capacity.replica_capacity`) on one process;
``parallel`` meshes need the served app (``magi serve``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncGenerator, AsyncIterator, Sequence

from cluster.capacity import replica_capacity
from cluster.config import ServiceConfig
from cluster.engine import AsyncEngine, Engine
from cluster.engine.compute import ComputeThread
from cluster.messages import CaptionEmbedding, EngineJob
from cluster.pipeline.flow import EngineEvent, Pipeline
from cluster.pipeline.stream import StreamClock
from cluster.serve.cancels import check_job_id
from cluster.serve.validate import validate_request
from magi.v1 import generate_pb2 as pb
from stages.config import ModelConfig
from stages.model_store import CheckpointPaths, ensure_checkpoints


class LocalStages:
    """:class:`cluster.pipeline.Stages` over models loaded in this process (CPU, float32).

    Raises (constructor):
        ValueError: ``cfg.parallel`` asks for more than one rank.
        FileNotFoundError, cluster.capacity.DoesNotFit: see the loaders and the planner.
    """

    def __init__(self, cfg: ServiceConfig, model: ModelConfig | None = None):
        from stages.text_encoder import T5TextEncoder  # noqa: PLC0415  (transformers: seconds)
        from stages.vae.codec import VaeCodec  # noqa: PLC0415
        from stages.vae.weights import load_vae  # noqa: PLC0415

        if cfg.parallel.world_size > 1:
            raise ValueError(f"parallel: {cfg.parallel.world_size} ranks need the served app (magi serve)")
        model = model or cfg.load_model()
        paths = ensure_checkpoints(model, cfg.checkpoint_root)
        self._t5 = T5TextEncoder(paths.text_encoder, model.text_encoder)
        self._codec = VaeCodec(load_vae(paths.vae, model.vae), model.vae, fps=model.sampling.fps)
        self.engine = AsyncEngine(_engine(cfg, model, paths))
        self._text_thread, self._vae_thread = ComputeThread("t5"), ComputeThread("vae")

    async def encode_text(self, texts: Sequence[str]) -> list[CaptionEmbedding]:
        pairs = await self._text_thread.call(self._t5.encode, list(texts))
        return [CaptionEmbedding(embedding=emb, mask=mask) for emb, mask in pairs]

    async def encode_image(self, image: Any) -> Any:
        return await self._vae_thread.call(self._codec.encode_image, image)

    async def encode_video(self, frames: Any) -> Any:
        return await self._vae_thread.call(self._codec.encode_video, frames)

    async def run(self, job: EngineJob) -> AsyncGenerator[EngineEvent, None]:
        await self.engine.submit(job)
        async for event in self.engine.events(job.spec.job_id):
            yield event

    async def cancel(self, job_id: str) -> bool:
        return await self.engine.cancel(job_id)

    async def decode(self, latent: Any, job_id: str) -> Any:
        return await self._vae_thread.call(self._codec.decode, latent, tag=job_id)

    async def close(self) -> None:
        """Stop the engine's step loop and the compute threads."""
        await self.engine.close()
        self._text_thread.close()
        self._vae_thread.close()


def _engine(cfg: ServiceConfig, model: ModelConfig, paths: CheckpointPaths) -> Engine:
    """The DiT engine of one process, limits as a DiTEngine replica's (float32 on CPU)."""
    capacity = replica_capacity(cfg, model, dtype="float32")
    return Engine.from_checkpoint(model, paths.dit, attention=cfg.engine.attention, queue_limit=cfg.engine.queue_limit,
                                  **capacity.engine_kwargs())


class LocalPipeline:
    """:class:`Pipeline` over :class:`LocalStages`: requests in, ``Generate`` messages out.

    Use as an async context manager (or call :meth:`close`), on one event loop.
    """

    def __init__(self, cfg: ServiceConfig):
        self.cfg, self.model = cfg, cfg.load_model()
        self.stages = LocalStages(cfg, self.model)
        self.pipeline = Pipeline(self.stages, self.model, cfg.max_pending_decodes, cfg.max_message_bytes)

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The job's messages, as the service streams them (see :class:`Pipeline`).

        Raises:
            stages.errors.InvalidInput: a bad request field (named), as the ingress's
                :func:`cluster.serve.validate.validate_request`; else what a stage raises.
        """
        clock = StreamClock()
        job_id = check_job_id(request.job_id) if request.job_id else uuid.uuid4().hex
        spec = await asyncio.to_thread(validate_request, request, self.model, self.cfg.limits, job_id)
        async for message in self.pipeline.generate(spec, clock):
            yield message

    async def close(self) -> None:
        await self.stages.close()

    async def __aenter__(self) -> "LocalPipeline":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
