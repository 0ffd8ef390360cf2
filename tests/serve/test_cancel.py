"""Cancelling a job stops the engine's work on it, whatever Serve's gRPC proxy does with the call.

Cancelling only the gRPC call is not enough through Ray Serve 2.60's proxy: a cancel that
reaches the proxy while it writes a response message is lost (grpc-aio never closes the
proxy's response generator, so the ingress request and the engine job run to their end; see
cluster/serve/cancels.py). The SDK therefore also sends ``Cancel(job_id)`` whenever a stream is
left early, with a job id it chose itself, and the engine refuses a job cancelled before it
arrived. Raw frames (several Chunk parts per chunk) make a cancel land mid-write often.
"""

import uuid

import grpc
import pytest

from cluster.client.sdk import make_request
from serve_helpers import poll

pytestmark = pytest.mark.serve

LONG = dict(num_chunks=32, num_steps=16)  # 140 forwards: every cancel lands long before the end
FORWARDS = 4 * (32 + 4 - 1)  # steps per stage * (chunks + window - 1)


def finished(dit_engine, job_id):
    """The job's stats once it left the engine (None if it is still there after 60 s)."""
    return poll(lambda: (s := dit_engine.job_stats.remote(job_id).result()) and s["finished_at"] and s)


def assert_cancelled(dit_engine, job_id):
    stats = finished(dit_engine, job_id)
    assert stats is not None, "the engine did not stop the cancelled job"
    assert stats["state"] == "cancelled", stats["state"]
    assert stats["total_forwards"] in (None, FORWARDS) and stats["steps"] < FORWARDS
    assert job_id not in dit_engine.active_jobs.remote().result()
    return stats


@pytest.mark.parametrize("fmt", ["fmp4", "raw"])
def test_cancel_stops_the_engine_work(client, dit_engine, fmt):
    stream = client.generate(make_request("an endless train journey", output_format=fmt, **LONG))
    with pytest.raises(grpc.RpcError) as info:
        for msg in stream:
            if msg.HasField("chunk"):  # the first chunk (part) arrived while the job runs: cancel
                stream.cancel()
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert_cancelled(dit_engine, stream.job_id)


def test_leaving_the_stream_early_cancels_the_job(client, dit_engine):
    with client.generate(make_request("a long walk", output_format="raw", **LONG)) as stream:
        for msg in stream:
            if msg.HasField("progress"):
                break  # no explicit cancel: leaving the loop and the block does it
    assert_cancelled(dit_engine, stream.job_id)


def test_cancel_by_id_ends_the_open_stream(client, dit_engine):
    stream = client.generate(make_request("a lighthouse at night", **LONG))
    kinds = []
    with pytest.raises(grpc.RpcError) as info:
        for msg in stream:
            kinds.append(msg.WhichOneof("event"))
            if kinds.count("progress") == 1:
                assert client.cancel(stream.job_id) is True  # the engine held the job
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert info.value.details().startswith(f"job {stream.job_id} was cancelled")  # + " (request id ...)"
    assert kinds[0] == "accepted" and "done" not in kinds
    assert_cancelled(dit_engine, stream.job_id)
    assert client.cancel(stream.job_id) is False  # idempotent


def test_a_job_cancelled_before_it_arrives_never_runs(client, dit_engine):
    job_id = f"early-{uuid.uuid4().hex}"
    assert client.cancel(job_id) is False  # not there yet: remembered
    request = make_request("a job nobody wants", **LONG)
    request.job_id = job_id
    stream = client.generate(request)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert stream.accepted is not None and stream.accepted.job_id == job_id
    stats = assert_cancelled(dit_engine, job_id)
    assert stats["steps"] == 0


def test_cancelling_one_job_leaves_the_other_running(client, dit_engine):
    doomed = client.generate(make_request("a doomed job", output_format="raw", **LONG))
    kept = client.generate(make_request("a job that finishes", num_chunks=2, num_steps=4, output_format="raw"))
    doomed_messages, kept_messages = iter(doomed), iter(kept)
    for msg in doomed_messages:  # both jobs are in the engine: the kept one is accepted, doomed runs
        if msg.HasField("progress"):
            break
    assert next(kept_messages).HasField("accepted")
    doomed.cancel()
    rest = [msg.WhichOneof("event") for msg in kept_messages]
    assert rest[-1] == "done" and kept.done.num_chunks == 2
    assert_cancelled(dit_engine, doomed.job_id)
    kept_stats = finished(dit_engine, kept.job_id)
    assert kept_stats["state"] == "done" and kept_stats["steps"] == kept_stats["total_forwards"]


def test_a_running_job_id_cannot_be_reused(client, dit_engine):
    first = client.generate(make_request("the original", **LONG))
    for msg in first:  # breaking out of a loop (outside a `with` block) does not cancel
        if msg.HasField("progress"):
            break
    duplicate = make_request("an impostor", num_chunks=1, num_steps=4)
    duplicate.job_id = first.job_id
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate(duplicate))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("job_id: "), info.value.details()
    assert first.job_id in dit_engine.active_jobs.remote().result()  # the original is untouched
    first.cancel()
    assert_cancelled(dit_engine, first.job_id)


@pytest.mark.parametrize("job_id", ["", "has space", "x" * 65, "semi;colon"])
def test_cancel_names_a_bad_job_id(client, job_id):
    with pytest.raises(grpc.RpcError) as info:
        client.cancel(job_id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("job_id: "), info.value.details()


RACE = dict(num_chunks=1, num_steps=4, height=32, width=48)  # a job of a few short forwards
RACE_REPETITIONS = 50  # served; tests/model/test_async_engine.py repeats the race 200 times without Serve


def test_cancel_as_soon_as_accepted_always_ends_cancelled(client, dit_engine):
    """Issue 9.4: Generate, then Cancel(job_id) as soon as JobAccepted arrives. Before the fix
    some streams ended OK with Done{0 chunks} while Cancel answered was_active=true."""
    outcomes = []
    for i in range(RACE_REPETITIONS):
        stream = client.generate(make_request(f"a race {i}", **RACE))
        kinds, was_active, code = [], None, grpc.StatusCode.OK
        try:
            for msg in stream:
                kinds.append(msg.WhichOneof("event"))
                if kinds == ["accepted"]:
                    was_active = client.cancel(stream.job_id)
        except grpc.RpcError as err:
            code = err.code()
        outcomes.append((stream.job_id, code, was_active, kinds))
    wrong = [o for o in outcomes if o[1] != grpc.StatusCode.CANCELLED or "done" in o[3]]
    assert not wrong, f"{len(wrong)} of {RACE_REPETITIONS} not CANCELLED: {wrong[:5]}"
    for job_id, *_ in outcomes:
        assert dit_engine.job_stats.remote(job_id).result()["state"] == "cancelled"
