"""A full engine refuses with RESOURCE_EXHAUSTED + google.rpc.RetryInfo; the SDK honours it."""

import re
import threading

import grpc
import pytest
from grpc_status import rpc_status

from cluster.client.sdk import MagiClient, RetryPolicy, make_request, retry_delay
from serve_helpers import poll

pytestmark = pytest.mark.serve

SHORT = make_request("one more", num_chunks=1, num_steps=4)


def fill_engine(service, client):
    """Start as many long jobs as the engine runs at once (the serve tests' config queues none)."""
    long = make_request("a slow river", num_chunks=service.cfg.limits.max_chunks, num_steps=4)
    streams = [client.generate(long) for _ in range(service.cfg.engine.max_active_jobs)]
    for stream in streams:
        next(msg for msg in stream if msg.HasField("progress"))
    return streams


def test_refusal_carries_retry_info(service, client, dit_engine):
    running = fill_engine(service, client)
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(client.generate(SHORT))
    finally:
        for stream in running:
            stream.cancel()
    error = info.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    status = rpc_status.from_call(error)
    assert status is not None and status.message == error.details()
    delay = retry_delay(error)
    words = re.search(r"retry in about ([0-9.]+) s\b", error.details())
    assert delay is not None and delay > 0 and words
    assert float(words.group(1)) == pytest.approx(delay, abs=0.05)
    assert poll(lambda: not dit_engine.active_jobs.remote().result())


def test_sdk_retries_a_refused_job_until_it_runs(service, client, dit_engine):
    running = fill_engine(service, client)
    policy = RetryPolicy(max_attempts=1000, max_delay_s=0.5)  # short waits: the test frees the engine
    with MagiClient(service.address, retry=policy) as patient:
        stream = patient.generate(SHORT)
        result = {}
        worker = threading.Thread(target=lambda: result.update(messages=list(stream)))
        worker.start()
        refused = poll(lambda: stream.attempts >= 2)
        for s in running:
            s.cancel()
        worker.join(timeout=300)
    assert refused, "the job was never refused"
    kinds = [m.WhichOneof("event") for m in result["messages"]]
    assert kinds.count("accepted") == 1 and kinds[0] == "accepted" and kinds[-1] == "done"
    assert stream.done.num_chunks == SHORT.num_chunks and stream.attempts >= 2
    assert poll(lambda: not dit_engine.active_jobs.remote().result())
