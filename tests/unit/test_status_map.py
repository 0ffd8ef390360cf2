"""cluster.serve.errors: exception -> gRPC status (code, words, request id), the one map."""

import logging

import grpc
import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from cluster.engine import EngineBusy, JobCancelled, JobNotFound
from cluster.serve import errors
from stages.errors import InvalidInput


def _in_task(exc: BaseException) -> BaseException:
    """``exc`` as a remote call re-raises it: a RayTaskError that is also an instance of its class."""
    try:
        raise exc
    except type(exc) as raised:
        return RayTaskError("f", "traceback text /a/b.py", raised).as_instanceof_cause()


CASES = [
    (InvalidInput("image", "is empty (0 bytes)"), grpc.StatusCode.INVALID_ARGUMENT, "image: is empty (0 bytes)"),
    (EngineBusy(queue_limit=0, active=2, queued=0, retry_after_s=3.0), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "retry in about 3.0 s"),
    (JobNotFound("j1"), grpc.StatusCode.NOT_FOUND, "j1"),
    (JobCancelled("j1"), grpc.StatusCode.CANCELLED, "job j1 was cancelled"),
    (ActorDiedError(), grpc.StatusCode.UNAVAILABLE, "retried with the same seed"),
    (ActorUnavailableError("unreachable", b"\x00" * 16), grpc.StatusCode.UNAVAILABLE, "retried with the same seed"),
    (RayActorError(), grpc.StatusCode.UNAVAILABLE, "retried with the same seed"),
    (KeyError("_private_method"), grpc.StatusCode.INTERNAL, "internal error"),
]


@pytest.mark.parametrize(("exc", "code", "words"), CASES, ids=[type(c[0]).__name__ for c in CASES])
@pytest.mark.parametrize("remote", [False, True])
def test_status_for(exc, code, words, remote):
    status = errors.status_for(_in_task(exc) if remote and not isinstance(exc, RayActorError) else exc)
    assert status.code == code and words in status.words
    assert "/" not in status.words and "Traceback" not in status.words and "_private" not in status.words


def test_levels_and_message_form():
    assert errors.status_for(InvalidInput("a", "b")).level == logging.WARNING
    assert errors.status_for(ValueError("bug")).level == logging.ERROR
    assert errors.with_request_id("a: b", "r1") == "a: b (request id r1)"
    assert errors.request_id() != errors.request_id()  # outside Serve: fresh ids
