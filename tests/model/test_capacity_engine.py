"""replica_capacity against the real engine: the planned KV pool is the pool Engine allocates, and
admission stops at the computed capacity (magi-tiny on CPU)."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.capacity import DoesNotFit, plan_fit, replica_capacity
from cluster.capacity.gpus import host_spec
from cluster.capacity.replica import replica_settings
from cluster.config import ServiceConfig
from cluster.engine import Engine
from cluster.messages import EngineJob, JobSpec, PromptSegment
from tests.model.test_engine_fixtures import caption, tiny  # noqa: F401 (fixture)


def default_size_job(job_id: str, cfg) -> EngineJob:
    spec = JobSpec(job_id=job_id, prompt_segments=(PromptSegment(0, "p"),), num_chunks=None, height=cfg.height,
                   width=cfg.width, seed=0, num_steps=cfg.sampling.num_steps)
    return EngineJob(spec, ((0, caption(1)),))


def test_planned_pool_is_the_engines_pool(tiny):
    model, dit = tiny
    cfg = ServiceConfig.from_dict({"model": "magi-tiny", "parallel": {"gpu": "cpu"}, "engine": {"max_active_jobs": 3}})
    cap = replica_capacity(cfg, model, dtype="float32")
    engine = Engine(model, dit, **cap.engine_kwargs())
    kv = cap.plan.kv
    assert engine.pool.num_blocks == cap.kv_pool_blocks and engine.pool.block_tokens == kv.block_tokens
    assert engine.preparer.default_blocks() == kv.blocks_per_job
    assert engine.pool.token_bytes == kv.token_bytes and engine.pool.nbytes == cap.plan.kv_pool_bytes
    assert engine.preparer.prepare(default_size_job("j", model)).areas == kv.areas
    assert engine.stats().max_active_jobs == cap.max_active_jobs == 3


def test_admission_stops_at_the_computed_capacity(tiny):
    """A device with room for exactly one job: the engine built from the capacity runs one job
    and queues the next, though engine.max_active_jobs allows four."""
    model, dit = tiny
    cfg = ServiceConfig.from_dict({"model": "magi-tiny", "engine": {"max_active_jobs": 4}})
    device = host_spec(1 << 20)
    with pytest.raises(DoesNotFit):
        replica_capacity(cfg, model, dtype="float32", device=device)
    while not (plan := plan_fit(model, device, replica_settings(cfg, device))).fits:  # grow by the shortfall
        device = dataclasses.replace(device, memory_bytes=device.memory_bytes + plan.shortfall_bytes)
    cap = replica_capacity(cfg, model, dtype="float32", device=device)
    assert cap.max_active_jobs == 1 and cap.kv_pool_blocks == cap.plan.kv.blocks_per_job
    engine = Engine(model, dit, **cap.engine_kwargs())
    first, second = engine.submit(default_size_job("a", model)), engine.submit(default_size_job("b", model))
    assert (first.state, second.state, second.queue_position) == ("active", "queued", 0)
    assert engine.stats().kv_pool_free_blocks == 0  # the region of the one admitted job fills the pool
