"""The engine over a parallel mesh on real Ray (issue 5.1 / 5.2): rank 0 in this process, the
other ranks Ray actors (:mod:`cluster.serve.ranks`), one gloo group. A multi-job pipeline
(three jobs of different lengths, one continuing a prefix video, joining and leaving at
different steps) must give the same clean chunks as the single-process engine, and so must a
job resumed from a snapshot taken over the sharded KV pool and a long job whose RoPE base
moves (ring keys re-based on every shard).

Tolerance: float32, |cp/pp - single| <= 1e-4 + 1e-4 * |single| on every latent after the
whole denoising walk (each forward differs by matmul blocking only, ~1e-6).
"""

from __future__ import annotations

import pytest
import torch

from cluster.config import DeploymentSettings, ParallelSettings
from cluster.engine import Engine
from cluster.serve.ranks import start_rank_group
from stages.config import magi_tiny
from stages.dit.weights import load_dit, write_tiny_checkpoint
from serve_helpers import poll
from tests.model.engine_fixtures import drain, image_latent, make_job

ATOL = RTOL = 1e-4
MESHES = [(2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = magi_tiny()
    path = tmp_path_factory.mktemp("mesh_dit")
    write_tiny_checkpoint(cfg.dit, path, seed=0)
    return cfg, path


def _engine(cfg, path, mesh, **kw) -> Engine:
    if mesh is None:
        return Engine(cfg, load_dit(path, cfg.dit), **kw)
    cp, pp = mesh
    group = start_rank_group(ParallelSettings(cp_size=cp, pp_size=pp, init_timeout_s=60), DeploymentSettings(num_cpus=0),
                             cfg, str(path), torch_threads=1)
    return Engine.from_checkpoint(cfg, path, ranks=group, **kw)


def _schedule(i: int, engine: Engine) -> None:
    if i == 0:
        engine.submit(make_job("a", 3, seed=1))
        engine.submit(make_job("b", 2, seed=2, prompt=2, prefix=image_latent()))
    if i == 3:
        engine.submit(make_job("c", 2, seed=3, prompt=3))


def _assert_same(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    worst = 0.0
    for job in want:
        assert got[job].keys() == want[job].keys()
        for c in want[job]:
            torch.testing.assert_close(got[job][c], want[job][c], atol=ATOL, rtol=RTOL)
            worst = max(worst, float((got[job][c] - want[job][c]).abs().max()))
    return worst


@pytest.fixture(scope="module")
def single(checkpoint):
    """(chunks of the single-process run, its KV-pool size in blocks)."""
    cfg, path = checkpoint
    engine = _engine(cfg, path, None, max_active_jobs=3)
    return drain(engine, _schedule), engine.pool.num_blocks


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"cp{m[0]}xpp{m[1]}")
def test_multi_job_pipeline_matches_single_process(service, checkpoint, single, mesh):
    cfg, path = checkpoint
    want, blocks = single
    engine = _engine(cfg, path, mesh, max_active_jobs=3)
    try:
        assert engine.pool.num_blocks == blocks
        cp, pp = mesh  # rank 0's shard: its pipeline stage's layers, its KV head groups (magi-tiny: 2 layers, 2 groups)
        assert (engine.pool.num_layers, engine.pool.layer(0)[0].shape[1]) == (2 // pp, 2 // cp)
        got = drain(engine, _schedule)
    finally:
        engine.close()
    assert {job: sorted(c) for job, c in got.items()} == {"a": [0, 1, 2], "b": [0, 1], "c": [0, 1]}
    worst = _assert_same(got, want)
    assert worst <= ATOL * 10  # every latent is within atol + rtol * |want| (|want| < 10)
    print(f"cp {mesh[0]} x pp {mesh[1]}: max |diff| = {worst:.2e}")


def _resume_run(engine: Engine) -> dict:
    """Job "r" (4 chunks) snapshotted after 5 steps, cancelled, resumed from the snapshot."""
    engine.submit(make_job("r", 4, seed=5))
    for _ in range(5):
        engine.step()
    snap = engine.snapshot("r")
    engine.cancel("r")
    engine.submit(make_job("r", 4, seed=5), resume=snap)
    return drain(engine)


def test_snapshot_and_rope_rebase_over_sharded_pool(service, checkpoint):
    """Snapshot reads merge every shard and resume writes split them; a 12-chunk job with a
    9-chunk RoPE horizon (the least allowed) re-bases the ring keys on every shard: same
    chunks as one process."""
    cfg, path = checkpoint
    want_resume = _resume_run(_engine(cfg, path, None, max_active_jobs=2))
    want_long = drain(_engine(cfg, path, None, rope_horizon_chunks=9), lambda i, e: i == 0 and e.submit(make_job("l", 12, 7)))
    engine = _engine(cfg, path, (2, 2), max_active_jobs=2)
    try:
        got_resume = _resume_run(engine)
    finally:
        engine.close()
    engine = _engine(cfg, path, (2, 1), rope_horizon_chunks=9)
    try:
        got_long = drain(engine, lambda i, e: i == 0 and e.submit(make_job("l", 12, 7)))
    finally:
        engine.close()
    assert sorted(got_long["l"]) == list(range(12))  # chunks 9..11 run after the RoPE base moved
    assert got_resume["r"] and _assert_same(got_resume, want_resume) <= ATOL * 10
    assert _assert_same(got_long, want_long) <= ATOL * 10


def test_served_replica_with_cp2_matches_cp1(service, client):
    """The whole app with ``parallel.cp_size: 2`` deployed beside the test service: the DiTEngine
    replica reserves 2 bundles (STRICT_PACK), its second rank runs in the second bundle, and a
    gRPC job routed to it (``application`` metadata) gives the frames of the cp 1 service."""
    import numpy as np
    from ray import serve
    from ray.util import placement_group_table

    from cluster.client.sdk import make_request
    from cluster.config import Deployments
    from cluster.serve.app import build_app
    from tests.serve.conftest import SERVE_TEST_CONFIG, Collected

    small = DeploymentSettings(num_cpus=0.1)
    cfg = SERVE_TEST_CONFIG.model_copy(update={
        "parallel": ParallelSettings(cp_size=2, init_timeout_s=60),
        "deployments": Deployments(ingress=small, text_encoder=small, dit_engine=small, vae_decoder=small),
    })
    before = set(placement_group_table())
    serve.run(build_app(cfg), name="magi-cp", route_prefix="/magi-cp")
    try:
        groups = [g for pg_id, g in placement_group_table().items() if pg_id not in before and g["state"] == "CREATED"]
        assert [(len(g["bundles"]), g["strategy"]) for g in groups] == [(2, "STRICT_PACK")]
        request = make_request("a lighthouse at dusk", num_chunks=2, num_steps=8, seed=11, output_format="raw")
        got = Collected(list(client.generate(request, metadata=(("application", "magi-cp"),))))
        serve.get_deployment_handle("DiTEngine", app_name="magi-cp").check_health.remote().result()
        want = Collected(list(client.generate(request, metadata=(("application", "magi"),))))
    finally:
        serve.delete("magi-cp")
    assert got.kinds.count("chunk") == want.kinds.count("chunk") > 0
    a = np.frombuffer(got.data(), np.uint8).astype(np.int16)
    b = np.frombuffer(want.data(), np.uint8).astype(np.int16)
    assert a.shape == b.shape
    assert int(np.abs(a - b).max()) <= 2  # uint8 frames; latents differ by ~1e-6 (rounding flips)


def test_dead_rank_fails_the_health_check(service, checkpoint):
    """A rank that dies makes ``RayPeers.check`` (the replica's Serve health check) raise,
    naming the rank, so that Serve replaces the replica."""
    import asyncio

    import ray

    cfg, path = checkpoint
    group = start_rank_group(ParallelSettings(cp_size=2, init_timeout_s=60), DeploymentSettings(num_cpus=0), cfg,
                             str(path), torch_threads=1)
    try:
        asyncio.run(group.peers.check(30))
        dead = group.peers.actors[0]
        ray.kill(dead)  # asynchronous: the actor may still answer a call made right after it
        assert poll(lambda: _actor_state(dead) == "DEAD", 60.0), "the killed rank never died"
        with pytest.raises(RuntimeError, match="rank 1 is not answering"):
            asyncio.run(group.peers.check(30))
    finally:
        group.close()


def _actor_state(actor) -> str:
    """The GCS's state of ``actor`` ("ALIVE", "DEAD", ...)."""
    from ray._private import state  # noqa: PLC0415 - the dashboard-free actor table

    return state.actors(actor._actor_id.hex())["State"]
