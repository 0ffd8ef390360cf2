"""UpdatePrompt through real gRPC: a running job's prompt changes from a future chunk on
(issue 4 point 5); a chunk already in flight is refused naming start_chunk; an unknown job is
NOT_FOUND.

The update is sent at the job's first Progress (the job is then running in the engine, chunk 0
in flight). The engine keeps window_size (4) chunks in flight and runs ahead of the client, so
the earliest valid start_chunk comes from the refusal's message ("the earliest chunk a new
prompt can start at is N"), plus a margin for the steps the engine runs meanwhile.
"""

import re

import grpc
import pytest

from cluster.client.sdk import make_request

pytestmark = pytest.mark.serve

CHUNKS = 24
NEW_PROMPT = "a green kite over a beach"


def request():
    return make_request("a red kite over a beach", num_chunks=CHUNKS, num_steps=4, seed=5, height=32, width=48,
                        output_format="raw")


def update_from_next_free_chunk(client, job_id: str) -> int:
    """Refused update at chunk 0 (in flight), then one a few chunks past the earliest allowed."""
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as info:
            client.update_prompt(job_id, 0, NEW_PROMPT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("start_chunk: "), info.value.details()
        earliest = int(re.search(r"can start at is (\d+)", info.value.details()).group(1))
        start = earliest + 4
        assert start < CHUNKS, "the job ran to its end before the update"
        try:
            reply = client.update_prompt(job_id, start, NEW_PROMPT)
        except grpc.RpcError as err:  # the engine passed `start` meanwhile: try further on
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("start_chunk: ")
            continue
        assert (reply.job_id, reply.start_chunk) == (job_id, start)
        return start
    raise AssertionError("no update landed")


def test_update_prompt_from_a_future_chunk(client, run_job):
    with pytest.raises(grpc.RpcError) as info:  # encodes (and caches) the new prompt: later updates are quick
        client.update_prompt("no-such-job", 3, NEW_PROMPT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    stream = client.generate(request())
    payloads, start = {}, None
    for msg in stream:
        if msg.HasField("progress") and start is None:
            start = update_from_next_free_chunk(client, stream.job_id)
        if msg.HasField("chunk"):
            payloads[msg.chunk.index] = payloads.get(msg.chunk.index, b"") + msg.chunk.data
    assert stream.done is not None and stream.done.num_chunks == CHUNKS

    plain = run_job(request())  # same job, no update
    assert all(payloads[i] == plain.payloads[i] for i in range(start))
    assert any(payloads[i] != plain.payloads[i] for i in range(start, CHUNKS))


def test_update_prompt_of_unknown_job_is_not_found(client):
    with pytest.raises(grpc.RpcError) as info:
        client.update_prompt("no-such-job", 3, "anything")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_update_prompt_bad_text_names_the_field(client):
    with pytest.raises(grpc.RpcError) as info:
        client.update_prompt("no-such-job", 3, "   ")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("text: ")
