"""Bounded API fuzz (issue 9): >= 2,000 requests from an outside client, no UNKNOWN, no INTERNAL,
no hang, no leak, and a healthy service afterwards.

Hypothesis draws GenerateRequest / UpdatePromptRequest / CancelRequest / HealthCheckRequest fields (edge values,
the nasty prompts and naughty strings of ../shared/inputs/bad, every file there and damaged
copies of the real prefix video as media) and raw bytes (random, or a valid request cut or
with a byte flipped). Most requests fail validation quickly; an accepted job is cancelled at
its JobAccepted (stream cancelled + Cancel(job_id)).
"""

import json
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import SERVE_TEST_CONFIG
from contract_client import LEAKS, SERVICE, call
from magi.v1 import generate_pb2 as pb
from serve_helpers import poll
from tests import shared_data
from tests.media_mutations import mp4_mutations

pytestmark = pytest.mark.serve

EXAMPLES = 2000
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED}
INT32 = (-2**31, 2**31 - 1)
QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")  # a request's own values, echoed in quotes
TINY_STEPS = SERVE_TEST_CONFIG.load_model().sampling.window_size  # the fewest steps a chunk can have


def _corpus():
    """(prompts, media) read from ../shared/inputs: strings and named byte blobs."""
    inputs = shared_data.inputs_dir()
    bad = inputs / "bad"
    if not bad.exists():
        return [], []
    prompts = [p["prompt"] for p in json.loads((bad / "nasty_prompts.json").read_text())]
    prompts += [s for s in json.loads((bad / "blns" / "blns.json").read_text()) if isinstance(s, str)]
    media = [(p.name, p.read_bytes()) for p in sorted(bad.iterdir()) if p.is_file() and p.suffix != ".json"]
    prefix = inputs / "videos" / "MAGI-1" / "example" / "assets" / "prefix_video.mp4"
    media += [(f"prefix_video:{k}", v) for k, v in mp4_mutations(prefix.read_bytes()).items()]
    return prompts, media


PROMPTS, MEDIA = _corpus()
texts = st.one_of(st.sampled_from(PROMPTS or [""]), st.text(max_size=40), st.just("a cat on a wall"))
small_ints = st.one_of(st.integers(-3, 4), st.sampled_from(INT32))
segments = st.lists(st.builds(pb.PromptSegment, start_chunk=small_ints, text=texts), max_size=3)
media = st.tuples(st.integers(0, 9), st.sampled_from(MEDIA or [("none", b"")]), st.booleans())


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Fuzzed fields; 1 in 5 starts from a tiny valid request (1 chunk, fewest steps) and changes
    at most one field, so that some jobs are accepted."""
    fields = dict(
        prompt_segments=draw(segments), num_chunks=draw(small_ints),
        height=draw(st.sampled_from([0, 0, 64, 100, 128, 4096, -64])),
        width=draw(st.sampled_from([0, 0, 64, 100, 128, 4096, -64])),
        seed=draw(st.integers(0, 2**64 - 1)), num_steps=draw(st.sampled_from([0, 4, 6, 8, 4096, -4])),
        output_format=draw(st.integers(-1, 3)),
        job_id=draw(st.one_of(st.just(""), st.text(max_size=70), st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True))))
    if draw(st.integers(0, 4)) == 0:
        keep = draw(st.sampled_from([None, *fields]))
        tiny = dict(prompt_segments=[pb.PromptSegment(start_chunk=0, text=draw(st.sampled_from(PROMPTS or ["a"])))],
                    num_chunks=1, height=0, width=0, num_steps=TINY_STEPS, output_format=0, job_id="")
        fields = {**fields, **{k: v for k, v in tiny.items() if k != keep}}
    req = pb.GenerateRequest(**fields)
    which, (_, blob), as_image = draw(media)
    if which >= 8:  # 1 in 5 requests carries media
        setattr(req, "image" if as_image else "prefix_video", blob)
    return req


def _damaged(data: bytes, draw) -> bytes:
    if not data:
        return data
    i = draw(st.integers(0, len(data) - 1))
    return data[:i] if draw(st.booleans()) else data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]


@st.composite
def calls(draw) -> tuple[str, bytes]:
    """(method, request bytes)."""
    method = draw(st.sampled_from(["Generate"] * 6 + ["Cancel", "UpdatePrompt", "Check"]))
    if method == "Check":
        message = health_pb2.HealthCheckRequest(service=draw(st.one_of(texts, st.just(SERVICE))))
    elif method == "Generate":
        message = draw(generate_requests())
    elif method == "Cancel":
        message = pb.CancelRequest(job_id=draw(texts))
    else:
        message = pb.UpdatePromptRequest(job_id=draw(texts), start_chunk=draw(small_ints), text=draw(texts))
    data = message.SerializeToString()
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return method, draw(st.binary(max_size=64))
    if kind == 1:
        return method, _damaged(data, draw)
    return method, data


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.address) as ch:
        yield ch


@pytest.mark.skipif(not MEDIA, reason="../shared/inputs not found")
def test_fuzz_no_unknown_no_internal_no_hang(channel, client, dit_engine):
    seen: dict[str, int] = {}
    accepted: list[str] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(calls())
    def one_call(method_and_bytes):
        method, data = method_and_bytes
        out = call(channel, method, data, timeout=60.0, max_messages=1,
                   service=HEALTH if method == "Check" else SERVICE)
        seen[out.code.name] = seen.get(out.code.name, 0) + 1
        assert out.code in ALLOWED, (method, data[:200], out.code, out.details)
        if out.code != grpc.StatusCode.OK and out.details != "cancelled by the test":
            assert out.request_id and not LEAKS.search(QUOTED.sub("", out.details)), out.details
        if method == "Generate" and out.messages:
            job_id = pb.GenerateResponse.FromString(out.messages[0]).accepted.job_id
            accepted.append(job_id)
            assert call(channel, "Cancel", pb.CancelRequest(job_id=job_id).SerializeToString()).code \
                == grpc.StatusCode.OK

    one_call()
    print(f"fuzz: {sum(seen.values())} calls, outcomes {seen}, {len(accepted)} jobs accepted and cancelled")
    assert sum(seen.values()) >= EXAMPLES
    assert client.health() == "SERVING"
    assert poll(lambda: not dit_engine.active_jobs.remote().result(), 120.0)
