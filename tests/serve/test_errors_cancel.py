"""Bad requests end with INVALID_ARGUMENT naming the field; a full engine refuses with a retry hint."""

import re

import grpc
import pytest

from cluster.client.sdk import make_request
from serve_helpers import poll
from magi.v1 import generate_pb2 as pb
from tests import shared_data

pytestmark = pytest.mark.serve

BAD = shared_data.inputs_dir() / "bad"  # ../shared/inputs/bad (tests/shared_data.py)


def with_job_id(request, job_id):
    request.job_id = job_id
    return request


CASES = {
    "empty_prompt": (make_request("", num_chunks=2), "prompt_segments[0].text"),
    "invisible_prompt": (make_request(" \n\t\u200b", num_chunks=2), "prompt_segments[0].text"),
    "nul_in_prompt": (make_request("a\x00b", num_chunks=2), "prompt_segments[0].text"),
    "no_prompt": (pb.GenerateRequest(num_chunks=2), "prompt_segments"),
    "zero_chunks": (make_request("a cat", num_chunks=0), "num_chunks"),
    "absurd_chunks": (make_request("a cat", num_chunks=10**9), "num_chunks"),
    "negative_chunks": (make_request("a cat", num_chunks=-3), "num_chunks"),
    "segment_after_end": (make_request("a cat", prompt_from=[(5, "later")], num_chunks=2),
                          "prompt_segments[1].start_chunk"),
    "height_not_multiple": (make_request("a cat", height=100, width=128), "height"),
    "steps_not_multiple": (make_request("a cat", num_steps=6), "num_steps"),
    "truncated_png": (make_request("a cat", image=BAD / "truncated_100B.png"), "image"),
    "text_named_png": (make_request("a cat", image=BAD / "text_file_named.png"), "image"),
    "huge_png": (make_request("a cat", image=BAD / "huge_dims_65535x65535.png"), "image"),
    "empty_image": (make_request("a cat", image=b""), "image"),
    "empty_video": (make_request("a cat", prefix_video=BAD / "zero_bytes.mp4"), "prefix_video"),
    "one_frame_video": (make_request("a cat", prefix_video=BAD / "single_frame_448x300.mp4"), "prefix_video"),
    "job_id_with_space": (with_job_id(make_request("a cat"), "my job"), "job_id"),
    "job_id_too_long": (with_job_id(make_request("a cat"), "j" * 65), "job_id"),
}


@pytest.mark.parametrize("request_, field", list(CASES.values()), ids=list(CASES))
def test_invalid_argument_names_the_field(client, request_, field):
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for msg in client.generate(request_):
            received.append(msg)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: "), info.value.details()
    assert received == []  # rejected before the job was accepted




def first_progress(stream):
    """Iterate ``stream`` up to its first Progress message (the job is running in the engine)."""
    messages = iter(stream)
    for msg in messages:
        if msg.HasField("progress"):
            return messages
    raise AssertionError("stream ended without progress")


def test_jobs_batch_and_a_full_engine_refuses_with_retry_hint(client, dit_engine):
    long = make_request("a slow river", num_chunks=32, num_steps=4)
    first, second = client.generate(long), client.generate(long)
    rest = [first_progress(first), first_progress(second)]  # both admitted (max_active_jobs=2)

    received = []
    with pytest.raises(grpc.RpcError) as info:
        for msg in client.generate(make_request("one more", num_chunks=1, num_steps=4)):
            received.append(msg.WhichOneof("event"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert received == ["accepted"]
    hint = re.search(r"retry in about ([0-9.]+) s \(request id [\w-]+\)$", info.value.details())
    assert hint and float(hint.group(1)) > 0

    # The two running jobs share DiT forwards (continuous batching): identical step intervals.
    next(rest[0]), next(rest[1])
    shared = set(_step_intervals(dit_engine, first.job_id)) & set(_step_intervals(dit_engine, second.job_id))
    assert shared
    first.cancel(), second.cancel()
    assert poll(lambda: not dit_engine.active_jobs.remote().result())


def _step_intervals(dit_engine, job_id: str) -> list[tuple[float, float]]:
    """Wall-clock (start, end) of the job's recent engine steps (its JobStat.step_intervals)."""
    return [tuple(i) for i in dit_engine.job_stats.remote(job_id).result()["step_intervals"]]
