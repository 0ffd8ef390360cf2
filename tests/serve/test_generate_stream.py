"""Generate through the real gRPC proxy: stream order, playable output, formats, conditioning."""

import io

import av
import numpy as np
import pytest

from cluster.client import cli
from cluster.client.sdk import make_request
from magi.v1 import generate_pb2 as pb
from tests import shared_data

pytestmark = pytest.mark.serve

INPUTS = shared_data.inputs_dir()  # ../shared/inputs (tests/shared_data.py)
FRAMES_PER_CHUNK = 24


def decode_mp4(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_stream_order_and_playable_mp4(run_job, dit_engine, vae_decoder, service):
    """Chunks in order, streamed (chunk 0 before the last step), a playable MP4, and the VAE
    decode of chunk 0 overlapping the DiT's later steps. The job is long enough (6 chunks) that
    the DiT still has several steps to run after chunk 0 is clean, so the overlap does not hang
    on the latency of the first decode call."""
    num_chunks, num_steps = 6, 4
    sampling = service.cfg.load_model().sampling
    job = run_job(make_request("a red fox running through snow", num_chunks=num_chunks, num_steps=num_steps, seed=1))
    assert job.kinds[0] == "accepted" and job.kinds[-1] == "done"
    assert job.kinds.count("accepted") == 1 and job.kinds.count("done") == 1
    acc = job.accepted
    assert (acc.num_chunks, acc.num_frames, acc.num_steps) == (num_chunks, num_chunks * FRAMES_PER_CHUNK, num_steps)

    chunk_order = [m.chunk.index for m in job.messages if m.HasField("chunk")]
    assert chunk_order == sorted(chunk_order) and sorted(set(chunk_order)) == list(range(num_chunks))
    # Streaming, not buffering: chunk 0 goes out before the engine runs the last chunk's final step.
    first_chunk = job.kinds.index("chunk")
    last_steps = [i for i, m in enumerate(job.messages)
                  if m.HasField("progress") and m.progress.chunk == num_chunks - 1 and m.progress.step == num_steps]
    assert last_steps and first_chunk < last_steps[0]

    frames = decode_mp4(job.data())
    assert len(frames) == acc.num_frames == job.done.total_frames
    assert frames[0].shape == (acc.height, acc.width, 3)
    assert 0 < job.done.ttfc_s <= job.done.total_s and job.done.num_chunks == num_chunks

    # Pipelining: chunk 0's VAE decode ran while the DiT was running a later step of the job.
    steps = dit_engine.job_stats.remote(acc.job_id).result()["step_intervals"]
    decodes = vae_decoder.decode_intervals.remote(acc.job_id).result()
    per = num_steps // sampling.window_size  # steps between two chunks (DESIGN.md section 3)
    assert len(steps) == per * (num_chunks + sampling.window_size - 1) and len(decodes) == num_chunks
    clean_0 = per * sampling.window_size  # chunk 0 is clean after this many steps
    d_start, d_end = decodes[0]
    assert d_start >= steps[clean_0 - 1][1]
    assert any(s < d_end and e > d_start for s, e in steps[clean_0:]), (steps, decodes)


def test_each_chunk_is_playable_on_its_own(run_job):
    """Chunk k > 0 decodes after the init segment alone (a client may join mid-stream)."""
    job = run_job(make_request("waves on a beach", num_chunks=2, num_steps=4))
    init_and_first = job.payloads[0]
    assert len(decode_mp4(init_and_first)) == FRAMES_PER_CHUNK
    assert len(decode_mp4(job.data())) == 2 * FRAMES_PER_CHUNK


def test_raw_frames_split_into_parts_and_deterministic(run_job):
    req = make_request("a lighthouse at night", num_chunks=1, num_steps=4, seed=7, output_format="raw")
    first, second = run_job(req), run_job(req)
    parts = [m.chunk for m in first.messages if m.HasField("chunk")]
    assert len(parts) > 1 and all(len(p.data) <= 256 * 1024 for p in parts)  # service max_message_bytes
    assert [p.part for p in parts] == list(range(len(parts))) and parts[-1].last_part
    assert all(p.format == pb.OUTPUT_FORMAT_RAW_RGB for p in parts)
    frames = np.frombuffer(first.data(), np.uint8).reshape(-1, 128, 128, 3)
    assert frames.shape[0] == FRAMES_PER_CHUNK
    assert first.data() == second.data()  # chunk noise seeded by (seed, chunk)
    other = run_job(make_request("a lighthouse at night", num_chunks=1, num_steps=4, seed=8, output_format="raw"))
    assert other.data() != first.data()


def test_prompt_change_image_and_video_conditioning(run_job):
    segmented = make_request("a cat sleeping", prompt_from=[(1, "a cat waking up")], num_chunks=2, num_steps=4)
    assert len(decode_mp4(run_job(segmented).data())) == 48

    i2v = make_request("the cat looks around", image=INPUTS / "images" / "skimage" / "chelsea.png",
                       num_chunks=1, num_steps=4, height=64, width=96)
    job = run_job(i2v)
    frames = decode_mp4(job.data())
    assert len(frames) == FRAMES_PER_CHUNK and frames[0].shape == (64, 96, 3)

    v2v = make_request("the scene continues", prefix_video=INPUTS / "videos" / "MAGI-1" / "example" / "assets" /
                       "prefix_video.mp4", num_chunks=1, num_steps=4)
    job = run_job(v2v)
    # 28 prefix frames = 7 latent frames: 1 whole prefix chunk + 1 leftover frame inside chunk 0,
    # which the engine cuts from the output: 24 - 4 frames.
    assert job.accepted.num_frames == job.done.total_frames == 20
    assert len(decode_mp4(job.data())) == 20


def test_cli_generate_against_running_service(service, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    status = cli.main(["generate", "--prompt", "a paper boat on a river", "--prompt-from", "1:the boat sinks",
                       "--chunks", "2", "--steps", "4", "--seed", "3", "-o", str(out),
                       "--address", service.address, "--quiet"])
    assert status == 0
    assert len(decode_mp4(out.read_bytes())) == 48
    printed = capsys.readouterr().out
    assert str(out) in printed and "TTFC" in printed and "TPOC" in printed
