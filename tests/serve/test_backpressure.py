"""Backpressure through real Ray + Serve + gRPC (issue 9 point 11): a client that stops reading
gets its job paused in the engine after a bounded number of chunks, the ingress and proxy do not
buffer the rest of its video, another job runs to its end meanwhile, and the stalled client
gets the whole video once it reads again (bitwise what an unstalled client gets)."""

import uuid

import grpc

from cluster.client.sdk import make_request
from cluster.serve.ray_patches import STREAM_OBJECTS
from magi.v1 import generate_pb2 as pb
from magi.v1 import generate_pb2_grpc as pb_grpc
from conftest import Collected
from contract_client import actor_pid, process_rss
from serve_helpers import poll

PROMPT = "a paper boat drifting down a gutter"
SETTLED_POLLS = 5  # the job stays paused with the same chunk count over this many polls


def emitted_bound(cfg, read_chunks: int) -> int:
    """Most chunks the engine may have produced for a client that read ``read_chunks`` and
    stalled, whatever the video's length: the engine's buffer (``engine.max_buffered_chunks``),
    the DiT -> ingress Ray stream (``STREAM_OBJECTS`` objects, at most one chunk each), the
    ingress's decodes (``max_pending_decodes``) + the chunk it is sending, the ingress -> proxy
    Ray stream (``STREAM_OBJECTS`` messages) + the message the ingress waits to yield + the one
    the proxy is writing (the client's 64 KiB HTTP/2 window holds less than one message)."""
    return read_chunks + cfg.engine.max_buffered_chunks + 2 * STREAM_OBJECTS + cfg.max_pending_decodes + 3


def stalled_state(dit_engine, job_id: str):
    """The job's stats once it is paused and its chunk count stopped moving (None before)."""
    seen = []

    def settled():
        stat = dit_engine.job_stats.remote(job_id).result()
        seen.append(stat and stat["paused"] and stat["chunks"])
        last = seen[-SETTLED_POLLS:]
        return stat if len(last) == SETTLED_POLLS and last[0] and len(set(last)) == 1 else None

    return poll(settled, timeout_s=120)


def test_a_stalled_client_pauses_its_job_without_buffering_and_gets_every_chunk(service, run_job, dit_engine):
    """The stalled client's channel sets ``grpc.http2.bdp_probe`` 0: gRPC would otherwise grow
    its HTTP/2 receive window (bandwidth-delay probing, to ~6 MB here) and let the proxy push that
    much more into the client's socket buffers, which no server-side bound can hold back; with
    it off the window stays 64 KiB, so what the service holds is what this test bounds."""
    cfg = service.cfg
    request = make_request(PROMPT, num_chunks=cfg.limits.max_chunks, num_steps=4, seed=11, output_format="raw")
    reference = run_job(request)  # an unstalled client; also warms the ingress and proxy up
    other_request = make_request(PROMPT, num_chunks=2, num_steps=4, seed=12)
    alone = run_job(other_request)
    acc = reference.accepted
    chunk_bytes = acc.width * acc.height * acc.frames_per_chunk * 3
    pids = {"proxy": actor_pid("ProxyActor"), "ingress": actor_pid("ServeReplica:magi:GrpcIngress")}
    before = {name: process_rss(pid) for name, pid in pids.items()}

    with grpc.insecure_channel(service.address, options=[("grpc.http2.bdp_probe", 0),
                                                         ("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stalled = pb.GenerateRequest()
        stalled.CopyFrom(request)
        stalled.job_id = uuid.uuid4().hex
        call = pb_grpc.VideoGenerationStub(channel).Generate(stalled)
        head = []
        for message in call:  # read up to the first chunk part, then stall
            head.append(message)
            if message.HasField("chunk"):
                break
        stat = stalled_state(dit_engine, stalled.job_id)
        assert stat is not None, dit_engine.job_stats.remote(stalled.job_id).result()  # never paused
        after = {name: process_rss(pid) for name, pid in pids.items()}
        other = run_job(other_request)  # runs to its end meanwhile
        still = dit_engine.job_stats.remote(stalled.job_id).result()
        rest = list(call)
    growth = {name: after[name] - before[name] for name in pids}
    bound = emitted_bound(cfg, read_chunks=1)
    print(f"stalled job: {stat['chunks']} of {acc.num_chunks} chunks emitted (bound {bound}), "
          f"RSS growth MiB {({k: round(v / 2**20, 1) for k, v in growth.items()})}, "
          f"bound {bound * chunk_bytes / 2**20:.1f} MiB; another job's total time beside the paused job / "
          f"alone: {other.done.total_s / alone.done.total_s:.2f}")
    assert stat["state"] == "active" and stat["paused"] and stat["chunks"] <= bound < acc.num_chunks
    assert sum(growth.values()) <= bound * chunk_bytes, growth
    assert other.done.num_chunks == alone.done.num_chunks and other.data() == alone.data()
    assert still["paused"] and (still["steps"], still["chunks"]) == (stat["steps"], stat["chunks"])  # no forward
    job = Collected(head + rest)
    assert job.done.num_chunks == acc.num_chunks and job.data() == reference.data()
    assert dit_engine.job_stats.remote(stalled.job_id).result()["pauses"] >= 1
