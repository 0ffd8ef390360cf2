"""``GrpcIngress`` deployment: the ``magi.v1.VideoGeneration`` service behind Serve's gRPC proxy.

Method names are the gRPC method names (Serve routes ``/pkg.Service/Method`` to
the ingress method ``Method``): ``Generate``, ``UpdatePrompt`` and ``Cancel``
(magi.v1), ``Check`` (grpc.health.v1; ``Watch`` is not served). Reflection runs in
the proxy itself (Serve's ``enable_reflection``). The ingress keeps the gRPC concerns (parse,
drain gate, status mapping); a job's flow (DESIGN.md section 2: text encode, DiT stream, VAE
decode overlapped with the DiT, mux, Done) is :class:`cluster.pipeline.Pipeline`, reaching the
stage deployments through :class:`ServeStages`. Requests arrive as raw bytes
(:mod:`cluster.serve.servicers`) and are parsed
here: an unparsable one gets INVALID_ARGUMENT "request: not a valid ...". Failures map
to statuses in :mod:`cluster.serve.errors` (INVALID_ARGUMENT naming the field,
RESOURCE_EXHAUSTED with the retry hint, UNAVAILABLE for a lost replica, INTERNAL "internal
error"), each message ending "(request id <id>)", the details logged once under that id.
A call ends without raising: a stream yields an event-less message after setting the
status (the proxy copies the status with it and drops it), a unary call returns an empty
response. A cancelled client stream cancels the DiT stream
and calls ``DiTEngine.cancel`` (the engine stops the job between steps) and the
pending decodes. Serve's gRPC proxy does not always pass a client's cancel on (see
:mod:`cluster.serve.cancels`), so ``Cancel(job_id)`` stops a job without it; the
job's stream, if the ingress still runs it, then ends with CANCELLED.
"""

from __future__ import annotations

import asyncio
from typing import AsyncGenerator, AsyncIterator

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import ServiceConfig
from cluster.engine import EngineBusy
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, Refusal
from cluster.pipeline import Pipeline, StreamClock
from cluster.pipeline.flow import EngineEvent
from cluster.serve import errors
from cluster.serve.cancels import check_job_id
from cluster.serve.drain import Gate, gated
from cluster.serve.retry import RetryPacer
from cluster.serve.health import ServingProbe
from cluster.serve.validate import parse_request, request_spec, validate_update
from magi.v1 import generate_pb2 as pb
from stages.errors import InvalidInput

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VideoGeneration"].full_name
_HEALTH_NAMES = ("", SERVICE_NAME, "grpc.health.v1.Health")


@serve.deployment(name="GrpcIngress")
class GrpcIngress:
    """gRPC entry point: validates, fans out to the stage deployments, streams the video."""

    def __init__(self, cfg: ServiceConfig, text_encoder: DeploymentHandle, dit: DeploymentHandle,
                 vae: DeploymentHandle):
        self._cfg = cfg
        self._model = cfg.load_model()
        self._text = text_encoder
        self._dit = dit
        self._pipeline = Pipeline(ServeStages(text_encoder, dit, vae), self._model, cfg.max_pending_decodes,
                                  cfg.max_message_bytes)
        self._gate = Gate()  # closed by drain()
        self._pacer = RetryPacer(cfg.engine.max_active_jobs)  # spreads the retry hints
        self._probe = ServingProbe(serve.get_replica_context().app_name, dit.deployment_name)

    async def Check(self, request: bytes, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1 ``Check``: SERVING / NOT_SERVING (:class:`ServingProbe`: can the app
        generate now; NOT_SERVING while draining) for "" and the served services; NOT_FOUND
        for another name."""
        rid = errors.request_id()
        try:
            service = parse_request(health_pb2.HealthCheckRequest, request, self._cfg.limits).service
        except InvalidInput as exc:
            errors.set_status(grpc_context, rid, "Check", exc)
            return health_pb2.HealthCheckResponse()
        if service not in _HEALTH_NAMES:
            errors.refuse(grpc_context, rid, "Check", grpc.StatusCode.NOT_FOUND, f"unknown service {service[:80]!r}")
            return health_pb2.HealthCheckResponse()
        if self._gate.closed:  # draining: load balancers should send new calls elsewhere
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=await self._probe.status())

    @gated
    async def Generate(self, request: bytes, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        """magi.v1 ``Generate``: one job's events (see the module docstring)."""
        rid = errors.request_id()
        try:
            async for message in self._generate(request):
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001  (mapped to a status, never lost)
            yield self._end(grpc_context, rid, exc)

    async def _generate(self, request: bytes) -> AsyncIterator[pb.GenerateResponse]:
        clock = StreamClock()
        spec = await asyncio.to_thread(_job_spec, request, self._model, self._cfg.limits)  # MBs of media: off the loop
        async for message in self._pipeline.generate(spec, clock):
            yield message

    def _end(self, grpc_context, rid: str, exc: Exception) -> pb.GenerateResponse:
        """Set the status of a failed stream; returns the event-less message that carries it."""
        cause = errors.unwrap(exc)
        if isinstance(cause, EngineBusy):  # RetryInfo travels on that message (cluster.serve.retry)
            message = self._pacer.refuse(grpc_context, cause, lambda words: errors.with_request_id(words, rid))
            errors.log_failure(rid, "Generate", errors.status_for(cause), None)
            return message
        errors.set_status(grpc_context, rid, "Generate", exc)
        return pb.GenerateResponse()

    async def drain(self) -> int:
        """Refuse new Generate calls from now on (UNAVAILABLE); returns the streams still running."""
        return self._gate.close()

    async def UpdatePrompt(self, request: bytes, grpc_context) -> pb.UpdatePromptResponse:
        """magi.v1 ``UpdatePrompt``: TextEncoder.encode(text) -> DiTEngine.update_prompt.

        Status (:mod:`cluster.serve.errors`): INVALID_ARGUMENT naming the field (``request``,
        ``job_id``, ``start_chunk``, ``text``), NOT_FOUND (no queued or running job with that
        id), UNAVAILABLE (a lost replica), INTERNAL otherwise. With several
        DiTEngine replicas the update may reach a replica that does not run the job
        (NOT_FOUND); one replica (the default) always holds every job.
        """
        rid = errors.request_id()
        try:
            req = parse_request(pb.UpdatePromptRequest, request, self._cfg.limits)
            job_id, start_chunk, text = validate_update(req, self._cfg.limits)
            (caption,) = await self._text.encode.remote([text])
            refusal = await self._dit.update_prompt.remote(job_id, start_chunk, caption)
            if refusal is not None:
                refusal.raise_error()
        except Exception as exc:  # noqa: BLE001  (mapped to a status)
            errors.set_status(grpc_context, rid, "UpdatePrompt", exc)
            return pb.UpdatePromptResponse()
        return pb.UpdatePromptResponse(job_id=job_id, start_chunk=start_chunk)

    async def Cancel(self, request: bytes, grpc_context) -> pb.CancelResponse:
        """magi.v1 ``Cancel``: ``DiTEngine.cancel(job_id)`` (a job not there yet is refused
        when it arrives; see :mod:`cluster.serve.cancels`).

        Status (:mod:`cluster.serve.errors`): INVALID_ARGUMENT (``request``, ``job_id``),
        UNAVAILABLE (a lost replica), INTERNAL otherwise.
        """
        rid = errors.request_id()
        try:
            job_id = check_job_id(parse_request(pb.CancelRequest, request, self._cfg.limits).job_id)
            was_active = await self._dit.cancel.remote(job_id)
        except Exception as exc:  # noqa: BLE001  (mapped to a status)
            errors.set_status(grpc_context, rid, "Cancel", exc)
            return pb.CancelResponse()
        return pb.CancelResponse(job_id=job_id, was_active=was_active)


class ServeStages:
    """:class:`cluster.pipeline.Stages` as calls to the stage deployments (Serve handles)."""

    def __init__(self, text_encoder: DeploymentHandle, dit: DeploymentHandle, vae: DeploymentHandle):
        self._text, self._dit, self._vae = text_encoder, dit, vae
        self._dit_stream = dit.options(stream=True)

    async def encode_text(self, texts) -> list[CaptionEmbedding]:
        return await self._text.encode.remote(list(texts))

    async def encode_image(self, image):
        return await self._vae.encode_image.remote(image)

    async def encode_video(self, frames):
        return await self._vae.encode_video.remote(frames)

    async def run(self, job: EngineJob) -> AsyncGenerator[EngineEvent, None]:
        """``DiTEngine.run`` (a stream); closing this generator early cancels the stream."""
        dit_stream = self._dit_stream.run.remote(job)
        finished = False
        try:
            async for event in dit_stream:
                if isinstance(event, Refusal):
                    event.raise_error()
                yield event
            finished = True
        finally:
            if not finished:
                dit_stream.cancel()

    async def cancel(self, job_id: str) -> bool:
        return await self._dit.cancel.remote(job_id)

    async def decode(self, latent, job_id: str):
        return await self._vae.decode.remote(latent, job_id)


def _job_spec(request: bytes, model, limits) -> JobSpec:
    """Parse and validate a Generate request (raw bytes) into its job spec (:func:`request_spec`).

    Raises:
        stages.errors.InvalidInput: the request does not parse or a field is invalid (named).
    """
    return request_spec(parse_request(pb.GenerateRequest, request, limits), model, limits)
