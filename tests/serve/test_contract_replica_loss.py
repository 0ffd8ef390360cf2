"""A lost replica (issue 9.3 and 9.7): UNAVAILABLE "retry with the same seed", and
Health/Check NOT_SERVING until Serve has replaced a dead DiTEngine replica.

Each test kills one replica of the shared service mid-job and waits until the service
is SERVING again (Serve starts a replacement), so later tests find it healthy.
"""

import grpc
import pytest
import ray

from cluster.client.sdk import make_request
from cluster.serve.app import APP_NAME
from contract_client import LEAKS, REQUEST_ID
from serve_helpers import poll

pytestmark = pytest.mark.serve

RECOVERY_S = 240.0


def kill_replica(deployment: str) -> None:
    """ray.kill the live replica actor of ``deployment`` (Serve notices and replaces it)."""
    from ray._private import state  # noqa: PLC0415 - the dashboard-free actor table

    names = [a["Name"] for a in state.actors(actor_state_name="ALIVE").values()
             if a["ActorClassName"] == f"ServeReplica:{APP_NAME}:{deployment}"]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def health(client) -> str:
    try:
        return client.health(timeout=5.0)
    except grpc.RpcError as err:
        return err.code().name


def running_job(client, chunks_from_data: int):
    """A Generate stream read up to its first Progress (the engine runs the job)."""
    stream = client.generate(make_request("a long river at dusk", num_chunks=chunks_from_data, num_steps=4))
    messages = iter(stream)
    for msg in messages:
        if msg.HasField("progress"):
            return stream, messages
    raise AssertionError("no progress")


def finish_with_error(messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        for _ in messages:
            pass
    return info.value


def assert_retryable(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert "retried with the same seed" in err.details() and REQUEST_ID.search(err.details()), err.details()
    assert not LEAKS.search(err.details()), err.details()


def test_dit_engine_death_is_unavailable_and_health_not_serving(client, service):
    stream, messages = running_job(client, service.cfg.limits.max_chunks)
    kill_replica("DiTEngine")
    # Polled before the stream ends: its error can come after Serve has replaced the replica.
    assert poll(lambda: health(client) == "NOT_SERVING", 60.0), "Check said SERVING with no live DiTEngine"
    assert_retryable(finish_with_error(messages))
    assert poll(lambda: health(client) == "SERVING", RECOVERY_S), "service did not recover"


def test_ingress_death_is_unavailable(client, service, dit_engine):
    stream, messages = running_job(client, service.cfg.limits.max_chunks)
    kill_replica("GrpcIngress")
    assert_retryable(finish_with_error(messages))
    assert poll(lambda: health(client) == "SERVING", RECOVERY_S), "service did not recover"
    client.cancel(stream.job_id)  # the engine still runs the orphaned job
    assert poll(lambda: not dit_engine.active_jobs.remote().result(), 120.0)
