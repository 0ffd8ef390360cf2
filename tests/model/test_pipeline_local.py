"""The in-process pipeline (cluster.pipeline.local, no Ray): a whole job, an early exit, a bad field."""

from __future__ import annotations

import asyncio
import io

import av
import numpy as np
import pytest

from cluster.client.sdk import make_request
from cluster.config import ServiceConfig
from cluster.pipeline.local import LocalPipeline
from stages.errors import InvalidInput


@pytest.fixture(scope="module")
def prompts(inputs_dir) -> list[str]:
    """Real prompts from ../shared/inputs (the VBench list)."""
    path = next(p for p in sorted((inputs_dir / "prompts").rglob("*.txt")))
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def local():
    loop = asyncio.new_event_loop()
    pipeline = LocalPipeline(ServiceConfig())
    yield pipeline, loop
    loop.run_until_complete(pipeline.close())
    loop.close()


def _collect(local, request, stop_after_chunk: bool = False) -> list:
    pipeline, loop = local

    async def run():
        messages = []
        stream = pipeline.generate(request)
        async for msg in stream:
            messages.append(msg)
            if stop_after_chunk and msg.HasField("chunk"):
                await stream.aclose()
                break
        return messages

    return loop.run_until_complete(run())


def test_a_job_streams_accepted_progress_chunks_done(local, prompts):
    request = make_request(prompts[0], num_chunks=2, num_steps=4, seed=3)
    messages = _collect(local, request)
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "accepted" and kinds[-1] == "done" and "progress" in kinds
    accepted, done = messages[0].accepted, messages[-1].done
    data = b"".join(m.chunk.data for m in messages if m.HasField("chunk"))
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == accepted.num_frames == done.total_frames
    assert frames[0].shape == (accepted.height, accepted.width, 3)
    assert done.num_chunks == accepted.num_chunks and done.ttfc_s > 0


def test_raw_output_is_deterministic(local, prompts):
    request = make_request(prompts[1], num_chunks=1, num_steps=4, seed=5, output_format="raw")
    runs = [b"".join(m.chunk.data for m in _collect(local, request) if m.HasField("chunk")) for _ in range(2)]
    accepted = _collect(local, request)[0].accepted
    assert len(runs[0]) == accepted.num_frames * accepted.height * accepted.width * 3
    assert runs[0] == runs[1] and np.frombuffer(runs[0], np.uint8).std() > 0


def test_leaving_early_cancels_the_job_in_the_engine(local, prompts):
    pipeline, loop = local
    request = make_request(prompts[2], num_chunks=6, num_steps=4, seed=1)
    before = loop.run_until_complete(pipeline.stages.engine.engine_stats()).jobs_finished["cancelled"]
    messages = _collect(local, request, stop_after_chunk=True)
    assert messages[-1].HasField("chunk")

    async def settled():
        while pipeline.stages.engine.active_jobs():
            await asyncio.sleep(0.05)
        return await pipeline.stages.engine.engine_stats()

    stats = loop.run_until_complete(asyncio.wait_for(settled(), 60))
    assert stats.jobs_finished["cancelled"] == before + 1 and stats.active_jobs == 0


def test_a_bad_field_is_named(local, prompts):
    request = make_request(prompts[0], num_chunks=1, num_steps=4)
    request.height = 7
    with pytest.raises(InvalidInput) as err:
        _collect(local, request)
    assert err.value.field == "height"
