"""A job the DiT engine queues is told its queue position until it starts (issue 4 point 3).

Runs the ``DiTEngine`` deployment class in-process (real engine, magi-tiny checkpoints) with
room for one active job, so a second job waits; the served app's test config refuses
instead of queueing (queue_limit 0).
"""

import asyncio

import pytest
import torch

from cluster.config import EngineSettings, ServiceConfig
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, Progress, PromptSegment
from cluster.serve.dit_engine import DiTEngineDeployment
from cluster.serve.engine_types import QueuePosition

pytestmark = pytest.mark.serve


def job(job_id: str) -> EngineJob:
    spec = JobSpec(job_id=job_id, prompt_segments=(PromptSegment(0, "p"),), num_chunks=2, height=64, width=64,
                   seed=1, num_steps=4)
    mask = torch.zeros(64, dtype=torch.int64)
    mask[:5] = 1
    return EngineJob(spec, ((0, CaptionEmbedding(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), mask)),))


async def collect(stream, first):
    return [first] + [event async for event in stream]


async def two_jobs():
    dep = DiTEngineDeployment.func_or_class(ServiceConfig(engine=EngineSettings(max_active_jobs=1, queue_limit=2)))
    first, second = dep.run(job("a")), dep.run(job("b"))
    head_a = await first.__anext__()
    head_b = await second.__anext__()
    a, b = await asyncio.gather(collect(first, head_a), collect(second, head_b))
    return a, b, dep.metrics()


def test_queued_job_gets_its_position_until_it_starts(service):
    a, b, exported = asyncio.run(two_jobs())
    assert isinstance(a[0], Progress) and not any(isinstance(e, QueuePosition) for e in a)
    assert b[0] == QueuePosition("b", 0)
    first_progress = next(i for i, e in enumerate(b) if isinstance(e, Progress))
    assert all(isinstance(e, QueuePosition) for e in b[:first_progress])
    assert not any(isinstance(e, QueuePosition) for e in b[first_progress:])
    assert sum(isinstance(e, LatentChunk) for e in b) == 2
    assert exported["chunks_produced"] == 4 and exported["gauges"]["queued_jobs"] == 0

