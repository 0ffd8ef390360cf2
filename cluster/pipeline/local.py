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
from typing import Any, AsyncGenerator, AsyncIterator, Sequence

from cluster.capacity import replica_capacity
from cluster.config import ServiceConfig
from cluster.engine.service import async_engine_for, engine_for
from cluster.engine.compute import ComputeThread
from cluster.messages import CaptionEmbedding, EngineJob
from cluster.pipeline.flow import EngineEvent, Pipeline
from cluster.pipeline.stream import StreamClock
from cluster.serve.validate import request_spec
from magi.v1 import generate_pb2 as pb
from stages.config import ModelConfig
from stages.model_store import ensure_checkpoints


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
        capacity = replica_capacity(cfg, model, dtype="float32")  # one process, float32 on CPU
        self.engine = async_engine_for(engine_for(cfg, model, paths.dit, capacity), cfg.engine)
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
                :func:`cluster.serve.validate.request_spec`; else what a stage raises.
        """
        clock = StreamClock()
        spec = await asyncio.to_thread(request_spec, request, self.model, self.cfg.limits)
        async for message in self.pipeline.generate(spec, clock):
            yield message

    async def close(self) -> None:
        await self.stages.close()

    async def __aenter__(self) -> "LocalPipeline":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
