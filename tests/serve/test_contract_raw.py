"""The API contract for an outside client (issue 9, points 1, 2, 3, 5, 6), over raw bytes.

Requests are built as bytes from data (the real prefix video, the malformed-input corpus,
a valid request serialized and then damaged), sent with grpc generic calls.
"""

import grpc
import pytest
from grpc_health.v1 import health_pb2

from cluster.client.sdk import make_request
from contract_client import LEAKS, actor_pid, call, process_rss, replica_log_lines
from magi.v1 import generate_pb2 as pb
from serve_helpers import poll
from tests.media_mutations import mp4_mutations

pytestmark = pytest.mark.serve

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.address) as ch:
        yield ch


def _bad_utf8(message: bytes, text: str) -> bytes:
    """``message`` with the UTF-8 bytes of ``text`` (a string field's value) replaced by 0xff bytes."""
    raw = text.encode()
    assert raw in message
    return message.replace(raw, b"\xff" * len(raw), 1)


def _truncated(message: bytes) -> bytes:
    """The first byte of ``message``: a field key whose value is missing."""
    return message[:1]


def _unparsable_cases():
    gen = make_request("a cat").SerializeToString()
    cancel = pb.CancelRequest(job_id="job-1").SerializeToString()
    update = pb.UpdatePromptRequest(job_id="job-1", start_chunk=1, text="a dog").SerializeToString()
    return {
        "generate_truncated_varint": ("Generate", _truncated(pb.GenerateRequest(num_chunks=2).SerializeToString())),
        "generate_bad_utf8": ("Generate", _bad_utf8(gen, "a cat")),
        "cancel_truncated": ("Cancel", _truncated(cancel)),
        "cancel_bad_utf8": ("Cancel", _bad_utf8(cancel, "job-1")),
        "update_truncated": ("UpdatePrompt", _truncated(update)),
        "update_bad_utf8": ("UpdatePrompt", _bad_utf8(update, "a dog")),
    }


@pytest.mark.parametrize("case", list(_unparsable_cases()))
def test_unparsable_request_is_invalid_argument_logged_once(channel, case):
    method, payload = _unparsable_cases()[case]
    out = call(channel, method, payload)
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT, (out.code, out.details)
    assert out.details.startswith("request: not a valid magi.v1."), out.details
    assert out.request_id and not LEAKS.search(out.details), out.details
    assert out.messages == []
    lines = poll(lambda: replica_log_lines("replica_magi_GrpcIngress_*", f"request {out.request_id} "), 30)
    assert lines and len(lines) == 1 and "WARNING" in lines[0], lines


def test_health_watch_is_unimplemented_and_check_unparsable_is_invalid(channel):
    out = call(channel, "Watch", health_pb2.HealthCheckRequest().SerializeToString(),
               service="grpc.health.v1.Health", max_messages=1)
    assert out.code == grpc.StatusCode.UNIMPLEMENTED, (out.code, out.details)
    out = call(channel, "Check", b"\x0a\x05\xff\xff\xff\xff\xff", service="grpc.health.v1.Health")
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.details.startswith("request: "), out.details


def test_corrupt_video_is_invalid_argument_in_words(channel, inputs_dir):
    prefix = (inputs_dir / "videos" / "MAGI-1" / "example" / "assets" / "prefix_video.mp4").read_bytes()
    for name in ("fourcc", "truncated_moov"):
        out = call(channel, "Generate", make_request("a cat", prefix_video=mp4_mutations(prefix)[name])
                   .SerializeToString())
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT, (name, out.code, out.details)
        assert out.details.startswith("prefix_video: "), out.details
        assert out.request_id and not LEAKS.search(out.details), out.details


def test_errors_carry_words_and_a_request_id_only(channel, inputs_dir):
    """Every refusal kind: field errors, media errors, unknown job, unknown health service."""
    bad = inputs_dir / "bad"
    outcomes = [
        call(channel, "Generate", make_request("a cat", image=bad / "truncated_100B.png").SerializeToString()),
        call(channel, "Generate", make_request("a cat", prefix_video=bad / "jpeg_named.mp4").SerializeToString()),
        call(channel, "Generate", make_request("", num_chunks=0).SerializeToString()),
        call(channel, "UpdatePrompt", pb.UpdatePromptRequest(job_id="nobody", start_chunk=1, text="x")
             .SerializeToString()),
        call(channel, "Check", health_pb2.HealthCheckRequest(service="no.such.Service").SerializeToString(),
             service="grpc.health.v1.Health"),
    ]
    codes = [o.code for o in outcomes]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 3 + [grpc.StatusCode.NOT_FOUND] * 2, outcomes
    for out in outcomes:
        assert out.request_id and not LEAKS.search(out.details), out.details
        for logs in ("replica_magi_GrpcIngress_*", "replica_magi_DiTEngine_*", "proxy_*"):  # no traceback
            assert not [line for line in replica_log_lines(logs, out.request_id) if "ERROR" in line]


def test_oversized_request_is_refused_before_buffering(channel, service):
    """A 200 MB Generate body: RESOURCE_EXHAUSTED from the proxy's length check; the proxy's
    and the ingress's memory stay where they were (printed, compared to the body size)."""
    cap = service.cfg.limits.request_cap()
    body = make_request("a cat", prefix_video=bytes(200 * MiB)).SerializeToString()
    assert len(body) > cap
    pids = {"proxy": actor_pid("ProxyActor"), "ingress": actor_pid("ServeReplica:magi:GrpcIngress")}
    before = {name: process_rss(pid) for name, pid in pids.items()}
    out = call(channel, "Generate", body)
    del body
    assert out.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT), out
    assert not LEAKS.search(out.details), out.details
    after = {name: process_rss(pid) for name, pid in pids.items()}
    growth = {name: (after[name] - before[name]) / MiB for name in pids}
    print(f"RSS growth after a 200 MiB request (MiB): {growth}")
    assert all(g < 64 for g in growth.values()), growth  # a buffered copy would be >= 200 MiB
    # The service still answers.
    assert call(channel, "Check", b"", service="grpc.health.v1.Health").code == grpc.StatusCode.OK
