"""cluster.serve.ray_patches in this process (no Ray instance): the stream bound wraps Serve's
router once (the hook may run again), keeps the original, is skipped on another Ray version and
when ``MAGI_STREAM_OBJECTS`` is 0. tests/serve/test_backpressure.py checks what it does."""

import pytest
import ray
from ray.serve._private.request_router import replica_wrapper

from cluster.serve import ray_patches

WRAPPER = replica_wrapper.ActorReplicaWrapper


@pytest.fixture()
def original():
    before = WRAPPER.send_request_python
    yield before
    WRAPPER.send_request_python = before


def test_bound_streams_wraps_the_router_once(original):
    first, second = ray_patches.STREAM_OBJECTS, ray_patches.STREAM_OBJECTS + 1
    assert ray_patches.bound_streams(first) and ray_patches.bound_streams(second)
    assert WRAPPER.send_request_python.__wrapped__ is original
    assert WRAPPER.send_request_python.stream_objects == second


def test_another_ray_version_is_left_alone(original, monkeypatch):
    monkeypatch.setattr(ray, "__version__", ray_patches.RAY_VERSION + ".post1")
    assert not ray_patches.bound_streams(ray_patches.STREAM_OBJECTS)
    assert WRAPPER.send_request_python is original


def test_setup_worker_reads_the_bound_from_the_environment(original, monkeypatch):
    monkeypatch.delenv(ray_patches.BIND_HOST_ENV, raising=False)
    monkeypatch.setenv(ray_patches.STREAM_OBJECTS_ENV, "0")
    ray_patches.setup_worker()
    assert WRAPPER.send_request_python is original
    monkeypatch.setenv(ray_patches.STREAM_OBJECTS_ENV, str(ray_patches.STREAM_OBJECTS + 2))
    ray_patches.setup_worker()
    assert WRAPPER.send_request_python.stream_objects == ray_patches.STREAM_OBJECTS + 2
