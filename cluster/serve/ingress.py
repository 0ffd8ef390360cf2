"""``GrpcIngress`` deployment: the ``magi.v1.VideoGeneration`` service behind Serve's gRPC proxy.

Method names are the gRPC method names (Serve routes ``/pkg.Service/Method`` to
the ingress method ``Method``): ``Generate``, ``UpdatePrompt`` and ``Cancel``
(magi.v1), ``Check`` (grpc.health.v1; ``Watch`` is not served). Reflection runs in
the proxy itself (Serve's ``enable_reflection``). The stream of a job (DESIGN.md section 2)::

    Accepted -> TextEncoder.encode (+ VaeDecoder.encode_image / encode_video)
             -> DiTEngine.run ~~> [Queued position ...] Progress ..., LatentChunk k ...
                 each LatentChunk k: VaeDecoder.decode(k) starts at once (a task),
                 while the DiT stream keeps being consumed (decode k || DiT on k+1)
             -> per chunk, in order: mux (fMP4 segment or raw RGB) -> Chunk parts
             -> Done (TTFC, TPOC)

Events go out in the order the engine produced them; a chunk takes its place in
the stream at the moment its latent was produced, and waits only for its own
decode. Bad requests end the stream with INVALID_ARGUMENT naming the field; a
full engine with RESOURCE_EXHAUSTED (the details end with the retry hint "retry in
about N s"); any other failure with INTERNAL. A cancelled client stream cancels the DiT stream
and calls ``DiTEngine.cancel`` (the engine stops the job between steps) and the
pending decodes. Serve's gRPC proxy does not always pass a client's cancel on (see
:mod:`cluster.serve.cancels`), so ``Cancel(job_id)`` stops a job without it; the
job's stream, if the ingress still runs it, then ends with CANCELLED.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import ServiceConfig
from cluster.engine import JobNotFound
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, Progress
from cluster.serve import stream
from cluster.serve.cancels import JobCancelled, check_job_id
from cluster.serve.engine_types import EngineFull, QueuePosition
from cluster.serve.validate import validate_request, validate_update
from magi.v1 import generate_pb2 as pb
from stages.errors import InvalidInput

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VideoGeneration"].full_name
_HEALTH_NAMES = ("", SERVICE_NAME, "grpc.health.v1.Health")


class _Abort(Exception):
    """Ends a gRPC call after ``grpc_context.set_code`` (Serve needs an exception, not a return)."""


@serve.deployment(name="GrpcIngress")
class GrpcIngress:
    """gRPC entry point: validates, fans out to the stage deployments, streams the video."""

    def __init__(self, cfg: ServiceConfig, text_encoder: DeploymentHandle, dit: DeploymentHandle,
                 vae: DeploymentHandle):
        self._cfg = cfg
        self._model = cfg.load_model()
        self._text = text_encoder
        self._dit_unary = dit
        self._dit = dit.options(stream=True)
        self._vae = vae

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1 ``Check``: SERVING for "" and the served services, NOT_FOUND otherwise."""
        if request.service not in _HEALTH_NAMES:
            _abort(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        """magi.v1 ``Generate``: one job's events (see the module docstring)."""
        clock = stream.StreamClock()
        try:
            job_id = check_job_id(request.job_id) if request.job_id else uuid.uuid4().hex
            spec = await asyncio.to_thread(validate_request, request, self._model, self._cfg.limits, job_id)
        except InvalidInput as exc:
            _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        yield stream.accepted(spec, self._model)
        try:
            job = await self._engine_job(spec)
            async for message in self._run(job, clock):
                yield message
        except (asyncio.CancelledError, GeneratorExit, _Abort):
            raise
        except Exception as exc:  # noqa: BLE001  (mapped to a status, never lost)
            _fail(grpc_context, spec.job_id, getattr(exc, "cause", None) or exc)  # unwrap RayTaskError

    async def UpdatePrompt(self, request: pb.UpdatePromptRequest, grpc_context) -> pb.UpdatePromptResponse:
        """magi.v1 ``UpdatePrompt``: TextEncoder.encode(text) -> DiTEngine.update_prompt.

        Status: INVALID_ARGUMENT naming the field (``job_id``, ``start_chunk``, ``text``),
        NOT_FOUND (no queued or running job with that id), INTERNAL otherwise. With several
        DiTEngine replicas the update may reach a replica that does not run the job
        (NOT_FOUND); one replica (the default) always holds every job.
        """
        try:
            job_id, start_chunk, text = validate_update(request, self._cfg.limits)
            (caption,) = await self._text.encode.remote([text])
            await self._dit_unary.update_prompt.remote(job_id, start_chunk, caption)
        except _Abort:
            raise
        except Exception as exc:  # noqa: BLE001  (mapped to a status)
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, JobNotFound):
                _abort(grpc_context, grpc.StatusCode.NOT_FOUND, str(cause))
            _fail(grpc_context, request.job_id, cause)
        return pb.UpdatePromptResponse(job_id=job_id, start_chunk=start_chunk)

    async def Cancel(self, request: pb.CancelRequest, grpc_context) -> pb.CancelResponse:
        """magi.v1 ``Cancel``: ``DiTEngine.cancel(job_id)`` (a job not there yet is refused
        when it arrives; see :mod:`cluster.serve.cancels`).

        Status: INVALID_ARGUMENT ("job_id: ..."), INTERNAL otherwise.
        """
        try:
            job_id = check_job_id(request.job_id)
        except InvalidInput as exc:
            _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            was_active = await self._dit_unary.cancel.remote(job_id)
        except Exception as exc:  # noqa: BLE001  (mapped to a status)
            cause = getattr(exc, "cause", None) or exc
            _abort(grpc_context, grpc.StatusCode.INTERNAL,
                   f"cancel of job {job_id} failed: {type(cause).__name__}: {cause}")
        return pb.CancelResponse(job_id=job_id, was_active=was_active)

    async def _engine_job(self, spec: JobSpec) -> EngineJob:
        """Caption embeddings (+ the conditioning latent) of a job, fetched concurrently."""
        captions = self._text.encode.remote([seg.text for seg in spec.prompt_segments])
        prefix = None
        if spec.image is not None:
            prefix = self._vae.encode_image.remote(spec.image)
        elif spec.prefix_video is not None:
            prefix = self._vae.encode_video.remote(spec.prefix_video)
        embeddings: list[CaptionEmbedding] = await captions
        return EngineJob(
            spec=spec,
            captions=tuple((seg.start_chunk, emb) for seg, emb in zip(spec.prompt_segments, embeddings)),
            prefix_latent=None if prefix is None else await prefix,
        )

    async def _run(self, job: EngineJob, clock: stream.StreamClock) -> AsyncIterator[pb.GenerateResponse]:
        spec = job.spec
        queue: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self._cfg.max_pending_decodes)
        dit_stream = self._dit.run.remote(job)
        pump = asyncio.create_task(self._pump(dit_stream, queue, slots))
        muxer = stream.ChunkMuxer(spec, self._model.sampling.fps)
        decode = None
        finished = False
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, pb.GenerateResponse):
                    yield item
                    continue
                index, decode = item
                frames = await decode
                data = await asyncio.to_thread(muxer.mux, frames, index == spec.num_chunks - 1)
                slots.release()
                clock.chunk_sent(len(frames))
                for part in stream.chunk_parts(index, len(frames), data, spec.output_format,
                                               self._cfg.max_message_bytes):
                    yield part
            finished = True
            yield clock.done()
        finally:
            if not finished and not pump.done():  # the DiT stream is open: stop the engine's work
                dit_stream.cancel()
                self._dit_unary.cancel.remote(spec.job_id)  # explicit, not only via the stream
            pump.cancel()
            _cancel_decodes(decode, queue)

    async def _pump(self, dit_stream, queue: asyncio.Queue, slots: asyncio.Semaphore) -> None:
        """Consume the DiT stream into ``queue``: Progress messages and (index, decode task)."""
        try:
            async for event in dit_stream:
                if isinstance(event, Progress):
                    queue.put_nowait(stream.progress(event))
                elif isinstance(event, QueuePosition):
                    queue.put_nowait(pb.GenerateResponse(queued=pb.Queued(position=event.position)))
                elif isinstance(event, LatentChunk):
                    await slots.acquire()
                    decode = asyncio.ensure_future(self._decode(event.latent, event.job_id))
                    queue.put_nowait((event.index, decode))
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (re-raised by the consumer)
            queue.put_nowait(exc)

    async def _decode(self, latent, job_id: str):
        return await self._vae.decode.remote(latent, job_id)


def _cancel_decodes(current: asyncio.Future | None, queue: asyncio.Queue) -> None:
    """Cancel the decode being awaited and those still queued (a no-op for finished ones)."""
    pending = [current] + [item[1] for item in _drain(queue) if isinstance(item, tuple)]
    for task in pending:
        if task is not None:
            task.cancel()


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _fail(grpc_context, job_id: str, cause: BaseException):
    """Map a failure after Accepted to a status: INVALID_ARGUMENT (a stage rejected a field),
    RESOURCE_EXHAUSTED (engine full; the details end "retry in about N s"), CANCELLED (the
    job was cancelled through ``Cancel``), else INTERNAL."""
    if isinstance(cause, JobCancelled):
        _abort(grpc_context, grpc.StatusCode.CANCELLED, str(cause))
    if isinstance(cause, InvalidInput):
        _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(cause))
    if isinstance(cause, EngineFull):  # Serve forwards only code + details on errors
        _abort(grpc_context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause))
    _abort(grpc_context, grpc.StatusCode.INTERNAL, f"job {job_id} failed: {type(cause).__name__}: {cause}")


def _abort(grpc_context, code: grpc.StatusCode, details: str):
    """Set the call's status and end it (raise: a bare return would read as OK)."""
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    raise _Abort(details)
