"""replica_capacity against the real engine: the planned KV pool is the pool Engine allocates, and
admission stops at the computed capacity (magi-tiny on CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cluster.capacity import DoesNotFit, plan_fit, replica_capacity
from cluster.capacity.gpus import host_spec
from cluster.capacity.replica import replica_settings
from cluster.capacity.working_set import forward_chunks, job_chunks
from cluster.config import ServiceConfig
from cluster.engine import Engine
from cluster.messages import EngineJob, JobSpec, PromptSegment
from tests.model.engine_fixtures import caption, tiny  # noqa: F401 (fixture)


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


def recorded_forwards(engine: Engine) -> list[int]:
    """Chunks of every packed forward the engine's runner runs from now on (the real forward,
    observed on its way through)."""
    seen: list[int] = []
    forward = engine.runner.forward_packed

    def observed(windows, pool):
        seen.append(sum(w.k for w in windows))
        return forward(windows, pool)

    engine.runner.forward_packed = observed
    return seen


@pytest.mark.parametrize("engine_cfg", [{}, {"batch_cfg": False}, {"max_forward_tokens": "window"},
                                        {"max_forward_tokens": 1}])
def test_engine_runs_the_forwards_that_were_planned(tiny, engine_cfg):
    """engine.batch_cfg / engine.max_forward_tokens reach the Engine through the capacity, and no
    forward the engine runs is larger than the planned largest forward."""
    model, dit = tiny
    sp, f = model.sampling, model.vae_spatial_factor
    tpc = model.dit.tokens_per_chunk(sp.chunk_width, model.height // f, model.width // f)
    if engine_cfg.get("max_forward_tokens") == "window":
        engine_cfg = {"max_forward_tokens": (sp.window_size + 1) * tpc}
    cfg = ServiceConfig.from_dict({"model": "magi-tiny", "parallel": {"gpu": "cpu"},
                                   "engine": {"max_active_jobs": 2, **engine_cfg}})
    cap = replica_capacity(cfg, model, dtype="float32")
    engine = Engine(model, dit, **cap.engine_kwargs())
    assert engine.runner.batch_cfg == cfg.engine.batch_cfg == cap.plan.settings.batch_cfg
    assert engine.runner.max_forward_tokens == cfg.engine.max_forward_tokens == cap.plan.settings.max_forward_tokens
    assert cap.max_active_jobs == 2
    seen = recorded_forwards(engine)
    for name in ("a", "b"):
        engine.submit(default_size_job(name, model))
    for _ in range(sp.num_steps + 1):  # W chunks in flight and a clean one re-forwarded: full windows
        engine.step()
    budget = cfg.engine.max_forward_tokens
    # T2V jobs at full windows: exactly the planner's formula without a V2V prefix; the replica
    # plans the longest prefix forward (limits.max_prefix_frames) on top, so never less
    t2v = forward_chunks(*job_chunks(model, cfg.engine.batch_cfg), 0, 2, None if budget is None else budget // tpc)
    assert max(seen) == t2v <= cap.plan.shape.chunks_per_forward
    if budget is not None:  # windows packed up to the budget, a larger window alone: several forwards a step
        assert max(seen) <= max(budget // tpc, sp.window_size + 1) and len(seen) > 2 * engine.stats().steps


def test_longest_v2v_prefix_is_the_planned_largest_forward(tiny):
    """With a one-window budget the largest forward is the prefix extraction of a V2V job that
    brings limits.max_prefix_frames (one window of all whole prefix chunks, never split)."""
    model, dit = tiny
    sp, f = model.sampling, model.vae_spatial_factor
    h, w = model.height // f, model.width // f
    window = (sp.window_size + 1) * model.dit.tokens_per_chunk(sp.chunk_width, h, w)
    cfg = ServiceConfig.from_dict({"model": "magi-tiny", "parallel": {"gpu": "cpu"},
                                   "limits": {"max_prefix_frames": 96},
                                   "engine": {"max_active_jobs": 2, "max_forward_tokens": window}})
    cap = replica_capacity(cfg, model, dtype="float32")
    prefix_chunks = 96 // sp.temporal_downsample_factor // sp.chunk_width
    assert prefix_chunks == 4 and cap.plan.shape.chunks_per_forward == sp.window_size + 1  # 4 < one window
    cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_prefix_frames": 192})})
    cap = replica_capacity(cfg, model, dtype="float32")
    assert cap.plan.shape.chunks_per_forward == 8 and cap.max_active_jobs == 2
    engine = Engine(model, dit, **cap.engine_kwargs())
    seen = recorded_forwards(engine)
    v2v = default_size_job("v2v", model)
    v2v = EngineJob(v2v.spec, v2v.captions, prefix_latent=torch.randn(16, 192 // sp.temporal_downsample_factor, h, w))
    assert engine.submit(v2v).state == "active"
    queued = engine.submit(default_size_job("t2v", model))  # the pool is sized for T2V regions: 17 + 14 > 28 blocks
    assert queued.state == "queued"
    for _ in range(3):
        engine.step()
    assert seen[0] == max(seen) == 8  # the prefix-extraction window: 48 latent frames = 8 chunks


def test_start_engine_passes_the_forward_settings(tmp_path):
    """The DiTEngine replica's start-up (cluster.serve.dit_engine.start_engine) builds its engine
    with engine.batch_cfg / engine.max_forward_tokens, as planned (magi-tiny checkpoints written
    to a temporary model store)."""
    from cluster.serve.dit_engine import start_engine  # noqa: PLC0415 (imports Ray Serve)

    cfg = ServiceConfig.from_dict({"checkpoint_root": str(tmp_path), "parallel": {"gpu": "cpu"},
                                   "engine": {"batch_cfg": False, "max_forward_tokens": 1920, "max_active_jobs": 3}})
    engine = start_engine(cfg)
    assert (engine.runner.batch_cfg, engine.runner.max_forward_tokens) == (False, 1920)
    assert engine.stats().max_active_jobs == 3
