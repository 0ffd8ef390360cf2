"""The in-process pipeline and the served path give byte-identical raw video for the same request
(issue 10.2: one path from prompt to MP4; both run cluster.pipeline.Pipeline)."""

import asyncio

import pytest

from cluster.client.sdk import make_request
from cluster.pipeline.local import LocalPipeline
from conftest import SERVE_TEST_CONFIG

pytestmark = pytest.mark.serve


def _prompt(inputs_dir) -> str:
    path = next(p for p in sorted((inputs_dir / "prompts").rglob("*.txt")))
    return next(line.strip() for line in path.read_text().splitlines() if line.strip())


def _in_process(request) -> list:
    async def run():
        async with LocalPipeline(SERVE_TEST_CONFIG) as local:
            return [m async for m in local.generate(request)]

    return asyncio.run(run())


def test_in_process_and_served_raw_output_are_byte_identical(run_job, inputs_dir):
    steps = SERVE_TEST_CONFIG.load_model().sampling.window_size
    request = make_request(_prompt(inputs_dir), num_chunks=2, num_steps=steps, seed=11, output_format="raw")
    served = run_job(request)
    local = _in_process(request)
    local_data = b"".join(m.chunk.data for m in local if m.HasField("chunk"))
    assert local[0].accepted.num_frames == served.accepted.num_frames
    assert len(local_data) == served.accepted.num_frames * served.accepted.height * served.accepted.width * 3
    assert local_data == served.data()
    assert [m.WhichOneof("event") for m in local] == served.kinds
