"""The gRPC services Serve's proxy serves (``grpc_servicer_functions`` of :mod:`cluster.serve.app`).

Runs in the gRPC proxy actor. Serve's proxy registers each servicer function's method
handlers, replaces their behaviour by "send to the ingress replica" and keeps their
request deserializer (Ray 2.60 ``ray/serve/_private/grpc_util.py``,
``gRPCGenericServer.add_generic_rpc_handlers``). Ours differ from the generated
``add_*Servicer_to_server`` in three ways:

- requests are not parsed in the proxy (no deserializer: the ingress gets the raw
  bytes), so an unparsable request reaches our code and gets INVALID_ARGUMENT instead of
  grpc's UNKNOWN "Unexpected DecodeError";
- ``grpc.health.v1.Health`` registers ``Check`` only: ``Watch`` is answered
  UNIMPLEMENTED by gRPC itself (reflection still describes the whole service);
- each handler is guarded (:class:`_GuardedHandler`): an event-less (empty) stream
  message, which the ingress yields to end a stream with a status without raising,
  is dropped, and an error status set by the proxy itself (a dead replica, Serve's
  own failures: INTERNAL with a Ray traceback) is replaced by words plus a request id,
  the original going to the proxy's log under that id.

The size cap on requests (``limits.request_cap()``) is the proxy's gRPC
``max_receive_message_length``, env ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, set where Ray
starts (:mod:`cluster.client.local`): gRPC refuses a longer message from its length
prefix with RESOURCE_EXHAUSTED before buffering it. On a cluster not started by
``LocalService`` the variable must be in the nodes' environment (``ray start``, the
Helm chart); without it the ingress still refuses such a request (INVALID_ARGUMENT,
:func:`cluster.serve.validate.parse_request`), but only after the proxy buffered it.
"""

from __future__ import annotations

import logging
import re
import uuid

import grpc
from grpc_health.v1 import health_pb2

from cluster.serve.errors import LOST_REPLICA, with_request_id
from magi.v1 import generate_pb2 as pb

logger = logging.getLogger("ray.serve")

#: Words for error statuses that Serve's proxy sets itself (never its own message).
_PROXY_WORDS = {
    grpc.StatusCode.UNAVAILABLE: "the service is not available right now; retry later",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the service is at capacity; retry later",
    grpc.StatusCode.CANCELLED: "the call was cancelled",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the call ran past its deadline",
    grpc.StatusCode.NOT_FOUND: "no application serves this call",
}
_LOST = re.compile(r"ActorDiedError|RayActorError|ActorUnavailableError|DeploymentUnavailable|"
                   r"actor (died|is dead)|actor.{0,80}(unavailable|unexpectedly)", re.IGNORECASE)
#: What must not reach a client: tracebacks, paths, addresses, pids, actor or deployment ids.
_LEAKY = re.compile(r"Traceback|File \"|/|\d+\.\d+\.\d+\.\d+|pid|[Aa]ctor|Deployment|Replica|ray\.|\b_\w+")


def add_video_generation_to_server(servicer, server) -> None:
    """Register ``magi.v1.VideoGeneration`` (Generate, UpdatePrompt, Cancel) on ``server``."""
    _register(server, pb.DESCRIPTOR.services_by_name["VideoGeneration"], servicer)


def add_health_to_server(servicer, server) -> None:
    """Register ``grpc.health.v1.Health`` with ``Check`` only (``Watch``: UNIMPLEMENTED)."""
    _register(server, health_pb2.DESCRIPTOR.services_by_name["Health"], servicer, only=("Check",))


def _register(server, service, servicer, only: tuple[str, ...] | None = None) -> None:
    """Raw-bytes method handlers for the ``service`` descriptor's methods (``only`` those named)."""
    handlers = {}
    for method in service.methods:
        if only is not None and method.name not in only:
            continue
        response = _message_class(method.output_type)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[f"/{service.full_name}/{method.name}"] = make(
            getattr(servicer, method.name), request_deserializer=None, response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((_GuardedHandler(handlers),))


def _message_class(descriptor):
    from google.protobuf import message_factory  # noqa: PLC0415

    return message_factory.GetMessageClass(descriptor)


class _GuardedHandler(grpc.GenericRpcHandler):
    """Method handlers by ``/service/method``; the ones served are wrapped by :func:`_guard`.

    ``_method_handlers`` is the attribute Serve's gRPC server reads and rewrites (it is
    that of grpc's own generic handler).
    """

    def __init__(self, method_handlers: dict[str, grpc.RpcMethodHandler]):
        self._method_handlers = method_handlers
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details):
        name = handler_call_details.method
        handler = self._method_handlers.get(name)
        if handler is None:
            return None
        cached = self._guarded.get(name)
        if cached is None or cached[0] is not handler:
            cached = (handler, _guard(handler))
            self._guarded[name] = cached
        return cached[1]


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            async for message in inner_stream(request, context):
                if message:  # b"": an event-less message that carried a status
                    yield message
            _sanitize(context)

        return handler._replace(unary_stream=unary_stream)
    inner_unary = handler.unary_unary

    async def unary_unary(request, context):
        response = await inner_unary(request, context)
        _sanitize(context)
        return response

    return handler._replace(unary_unary=unary_unary)


def _sanitize(context) -> None:
    """Replace an error status the proxy set itself by words + a request id (logged with the original)."""
    code, details = context.code(), context.details() or ""
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    if code in (None, grpc.StatusCode.OK) or (details.endswith(")") and "(request id " in details):
        return
    rid = uuid.uuid4().hex[:16]
    logger.warning("request %s: the proxy ended a call with %s: %s", rid, code.name, details[:4000])
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        code, words = (grpc.StatusCode.UNAVAILABLE, LOST_REPLICA) if _LOST.search(details) else (code, "internal error")
    else:  # a refusal in words (a closed drain gate) keeps them; Serve's own messages do not
        words = _PROXY_WORDS.get(code, "the call failed") if _LEAKY.search(details) or not details else details
    context.set_code(code)
    context.set_details(with_request_id(words, rid))
