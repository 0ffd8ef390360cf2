"""What a client sees when a call fails: a status code, the error in words and a request id.

The one place that maps exceptions to gRPC statuses (the ingress calls :func:`status_for`
and :func:`set_status`). A client never sees a traceback, file path, pid, IP address,
actor name/id or private method name: the details go to the log, one line under the
same request id (WARNING for a refused request, ERROR with the traceback for a bug).

| exception | code | words |
|---|---|---|
| :class:`stages.errors.InvalidInput` | INVALID_ARGUMENT | "<field>: <reason>" |
| :class:`cluster.engine.EngineBusy` | RESOURCE_EXHAUSTED | its message ("... retry in about N s") |
| :class:`cluster.engine.JobNotFound` | NOT_FOUND | its message |
| :class:`cluster.engine.JobCancelled` | CANCELLED | "job <id> was cancelled" |
| a lost replica (``RayActorError``, ``ActorDiedError``, ``ActorUnavailableError``, Serve's ``DeploymentUnavailableError``) | UNAVAILABLE | :data:`LOST_REPLICA` |
| anything else | INTERNAL | "internal error" |

Every message ends with " (request id <id>)" (:func:`with_request_id`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import grpc
from ray.exceptions import RayTaskError

from stages.errors import InvalidInput

#: Logger of Serve's replica log files (each line also carries Serve's request id).
logger = logging.getLogger("ray.serve")

LOST_REPLICA = ("the service lost a replica while running this request; "
                "it can be retried with the same seed")
_LOST_REPLICA_ERRORS = ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                        "DeploymentUnavailableError", "ActorUnschedulableError")


@dataclass(frozen=True)
class Status:
    """A call's outcome for the client: ``code``, ``words`` (no request id yet), log ``level``."""

    code: grpc.StatusCode
    words: str
    level: int = logging.WARNING


def request_id() -> str:
    """Serve's id of the current request (also sent as ``request_id`` trailing metadata and
    written on Serve's log lines), or a fresh one outside a Serve request."""
    try:
        from ray.serve.context import _get_serve_request_context  # noqa: PLC0415

        rid = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - no Serve context (in-process use)
        rid = ""
    return rid or uuid.uuid4().hex[:16]


def with_request_id(words: str, rid: str) -> str:
    """``"<words> (request id <rid>)"``: the form of every error message a client gets."""
    return f"{words} (request id {rid})"


def unwrap(exc: BaseException) -> BaseException:
    """The user exception inside a ``RayTaskError`` (its ``cause``), else ``exc``."""
    return exc.cause if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) else exc


def is_lost_replica(exc: BaseException) -> bool:
    """True for Ray/Serve errors meaning a replica (actor) died or cannot be reached."""
    return any(cls.__name__ in _LOST_REPLICA_ERRORS for cls in type(exc).__mro__)


def status_for(exc: BaseException) -> Status:
    """The status a client gets for ``exc`` (see the module table)."""
    # Imported here: Serve's gRPC proxy imports this module (via cluster.serve.servicers)
    # and should not load torch with cluster.engine.
    from cluster.engine import EngineBusy, JobCancelled, JobNotFound  # noqa: PLC0415

    cause = unwrap(exc)
    if isinstance(cause, InvalidInput):
        return Status(grpc.StatusCode.INVALID_ARGUMENT, str(cause))
    if isinstance(cause, EngineBusy):
        # Issue 9.10: RetryInfo for the engine-full case (cluster/serve/retry.py) is added by
        # the ingress at its one refusal call site (GrpcIngress._refuse).
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause), logging.INFO)
    if isinstance(cause, JobNotFound):
        return Status(grpc.StatusCode.NOT_FOUND, str(cause), logging.INFO)
    if isinstance(cause, JobCancelled):
        return Status(grpc.StatusCode.CANCELLED, str(cause), logging.INFO)
    if is_lost_replica(cause) or is_lost_replica(exc):
        return Status(grpc.StatusCode.UNAVAILABLE, LOST_REPLICA)
    return Status(grpc.StatusCode.INTERNAL, "internal error", logging.ERROR)


def log_failure(rid: str, method: str, status: Status, exc: BaseException | None) -> None:
    """One log line under ``rid``: the status and what caused it (the traceback only at ERROR)."""
    logger.log(status.level, "request %s %s failed: %s %s%s", rid, method, status.code.name, status.words,
               _detail(exc), exc_info=exc if status.level >= logging.ERROR else None)


def _detail(exc: BaseException | None) -> str:
    """`` [Type: message]`` of the error behind ``exc`` (a decoder's error behind an InvalidInput)."""
    cause = None if exc is None else unwrap(exc)
    origin = cause.__cause__ if isinstance(cause, InvalidInput) else cause
    return "" if origin is None else f" [{type(origin).__name__}: {str(origin)[:2000]}]"


def set_status(grpc_context, rid: str, method: str, exc: BaseException) -> Status:
    """Map ``exc``, log it once under ``rid`` and set code + "<words> (request id <rid>)" on the call.

    The caller then ends the call without raising: a unary method returns an empty
    response, a stream yields an event-less message and returns (Serve's proxy copies the
    status onto the call with that message, and :mod:`cluster.serve.servicers` drops it).
    A raise would be logged with its traceback by Serve's replica and proxy.
    """
    status = status_for(exc)
    log_failure(rid, method, status, exc)
    grpc_context.set_code(status.code)
    grpc_context.set_details(with_request_id(status.words, rid))
    return status


def refuse(grpc_context, rid: str, method: str, code: grpc.StatusCode, words: str) -> None:
    """Like :func:`set_status` for a refusal that is no exception (logged at INFO)."""
    status = Status(code, words, logging.INFO)
    log_failure(rid, method, status, None)
    grpc_context.set_code(code)
    grpc_context.set_details(with_request_id(words, rid))
