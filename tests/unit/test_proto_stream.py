"""Response-stream helpers: chunk splitting under the message limit, muxing, TTFC/TPOC, requests."""

import numpy as np
import pytest

from cluster.client import cli
from cluster.client.sdk import make_request
from cluster.messages import JobSpec, OutputFormat, PromptSegment, Progress
from cluster.pipeline import stream
from magi.v1 import generate_pb2 as pb
from stages.config import magi_tiny


def spec(fmt=OutputFormat.RAW_RGB, chunks=3):
    return JobSpec(job_id="j", prompt_segments=(PromptSegment(0, "a"),), num_chunks=chunks,
                   height=32, width=48, seed=0, num_steps=8, output_format=fmt)


@pytest.mark.parametrize("size, max_bytes, parts", [(0, 10, 1), (10, 10, 1), (11, 10, 2), (95, 10, 10)])
def test_chunk_parts_reassemble(size, max_bytes, parts):
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    msgs = stream.chunk_parts(4, 24, data, OutputFormat.FMP4, max_bytes)
    assert len(msgs) == parts
    assert b"".join(m.chunk.data for m in msgs) == data
    assert all(len(m.chunk.data) <= max_bytes for m in msgs)
    assert [m.chunk.part for m in msgs] == list(range(parts))
    assert [m.chunk.last_part for m in msgs] == [False] * (parts - 1) + [True]
    assert {(m.chunk.index, m.chunk.num_frames, m.chunk.format) for m in msgs} == {(4, 24, pb.OUTPUT_FORMAT_FMP4)}


def test_serialized_parts_stay_under_grpc_default():
    data = b"\xff" * (10 * 1024 * 1024)
    msgs = stream.chunk_parts(0, 24, data, OutputFormat.RAW_RGB, 3 * 1024 * 1024)
    assert max(m.ByteSize() for m in msgs) < 4 * 1024 * 1024


def test_accepted_and_progress_messages():
    model = magi_tiny()
    acc = stream.accepted(spec(chunks=3), model).accepted
    assert (acc.num_chunks, acc.frames_per_chunk, acc.num_frames) == (3, 24, 72)
    assert (acc.width, acc.height, acc.fps, acc.output_format) == (48, 32, 24, pb.OUTPUT_FORMAT_RAW_RGB)
    prog = stream.progress(Progress("j", chunk=1, step=3, num_steps=8)).progress
    assert (prog.chunk, prog.step, prog.num_steps) == (1, 3, 8)


def test_expected_frames_cut_the_v2v_leftover():
    model = magi_tiny()
    assert stream.expected_frames(spec(chunks=2), model) == 48
    prefix = np.zeros((28, 32, 48, 3), np.uint8)  # 7 latent frames = 1 prefix chunk + 1 leftover
    v2v = JobSpec(**{**spec(chunks=2).__dict__, "prefix_video": prefix})
    assert stream.expected_frames(v2v, model) == 48 - 4
    i2v = JobSpec(**{**spec(chunks=2).__dict__, "image": prefix[0]})
    assert stream.expected_frames(i2v, model) == 48


def test_raw_muxer_is_frame_bytes():
    frames = np.random.default_rng(0).integers(0, 255, (24, 32, 48, 3), dtype=np.uint8)
    data = stream.ChunkMuxer(spec(), fps=24).mux(frames, last=False)
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(frames.shape), frames)


def test_clock_ttfc_tpoc():
    clock = stream.StreamClock(start=0.0, chunk_times=[2.0, 3.0, 5.0], frames=72)
    done = clock.done().done
    assert (done.ttfc_s, done.tpoc_s, done.num_chunks, done.total_frames) == (2.0, 1.5, 3, 72)
    assert done.total_s >= 5.0
    single = stream.StreamClock(start=0.0, chunk_times=[1.0]).done().done
    assert (single.ttfc_s, single.tpoc_s) == (1.0, 0.0)


def test_make_request(tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"png-bytes")
    req = make_request("a", prompt_from=[(3, "c"), (1, "b")], image=img, num_chunks=4, num_steps=8,
                       seed=5, height=64, width=64, output_format="raw")
    assert [(s.start_chunk, s.text) for s in req.prompt_segments] == [(0, "a"), (1, "b"), (3, "c")]
    assert req.WhichOneof("condition") == "image" and req.image == b"png-bytes"
    assert (req.num_chunks, req.num_steps, req.seed, req.output_format) == (4, 8, 5, pb.OUTPUT_FORMAT_RAW_RGB)
    with pytest.raises(ValueError, match="not both"):
        make_request("a", image=b"x", prefix_video=b"y")
    with pytest.raises(ValueError, match="output_format"):
        make_request("a", output_format="gif")


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--prompt", "x", "--prompt-from", "notanumber", "-o", str(tmp_path / "o.mp4")])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "x", "--image", str(tmp_path / "missing.png"), "-o", "o.mp4"])
    assert "no such file" in capsys.readouterr().err
