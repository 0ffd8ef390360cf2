"""Distributed DiT forward (Ulysses context parallelism x layer pipeline) against the single process.

Real processes (torch.multiprocessing spawn), torch.distributed gloo on CPU, the magi-tiny DiT
(2 layers, 4 heads, 2 KV groups) from a tiny checkpoint, float32. One spawn per mesh runs the
two-forward case of :mod:`tests.model.parallel_cases`; velocities and the KV pool (shards merged)
must equal the single-process run within TOL (all-to-alls are exact; the projections run on
token slices, so float32 matmul blocking may differ: measured max abs diff is printed).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from stages.dit.weights import load_dit, write_tiny_checkpoint
from stages.parallel.kv_shards import merge_kv_reads
from stages.parallel.mesh import MeshShape, free_tcp_init_method, kv_groups_of
from tests.model.parallel_cases import make_pool, rank_main, run_case, tiny_cfg

TOL = dict(atol=1e-5, rtol=1e-5)
SPAWN_LIMIT_S = 90


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit_parallel_ckpt")
    write_tiny_checkpoint(tiny_cfg(), folder, seed=3)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """The single-process run (no mesh): velocities of both forwards and the whole pool."""
    cfg = tiny_cfg()
    dit = load_dit(tiny_ckpt, cfg)
    out = run_case(dit.forward_packed, cfg, make_pool(cfg, cfg.num_layers, cfg.num_query_groups), lambda full: full,
                   dit.rope_shift(2))
    return dit, out


def _spawn(shape: MeshShape, ckpt, out_dir, shift, micro_batches=None) -> list[dict]:
    """Run every rank of ``shape`` in its own process; returns each rank's saved results."""
    args = (shape, free_tcp_init_method(), str(ckpt), str(out_dir), shift, micro_batches)
    ctx = mp.start_processes(rank_main, args=args, nprocs=shape.world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_LIMIT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"mesh {shape} did not finish in {SPAWN_LIMIT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(shape.world_size)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "cp,pp,micro_batches",
    [(2, 1, None), (4, 1, None), (1, 2, None), (2, 2, 3)],
    ids=["cp2", "cp4-kv-replicated", "pp2", "pp2xcp2"],
)
def test_mesh_forward_equals_single_process(cp, pp, micro_batches, tiny_ckpt, reference, tmp_path):
    dit, ref = reference
    cfg = dit.cfg
    shape = MeshShape(cp_size=cp, pp_size=pp)
    results = _spawn(shape, tiny_ckpt, tmp_path, dit.rope_shift(2), micro_batches)
    diffs = []
    for rank, res in enumerate(results):
        if shape.pp_stage_of(rank) != pp - 1:
            assert res["v1"] is None and res["v2"] is None, f"rank {rank} is not on the last pipeline stage"
            continue
        for key in ("v1", "v2"):
            assert [v.shape for v in res[key]] == [v.shape for v in ref[key]]
            diffs.append(_max_diff(res[key], ref[key]))
            for got, want in zip(res[key], ref[key]):
                torch.testing.assert_close(got, want, **TOL)
    merged = merge_kv_reads([r["pool"] for r in results], shape, cfg)
    pool_diff = max(_max_diff(list(m), list(r)) for m, r in zip(merged, ref["pool"]))
    print(f"cp {cp} x pp {pp}: velocities max abs diff {max(diffs):.2e}, KV pool {pool_diff:.2e}")
    for (mk, mv), (rk, rv) in zip(merged, ref["pool"]):
        torch.testing.assert_close(mk, rk, **TOL)
        torch.testing.assert_close(mv, rv, **TOL)
    _check_replicas(results, shape, cfg)


def _check_replicas(results: list[dict], shape: MeshShape, cfg) -> None:
    """A KV group stored by several cp ranks (cp_size > G) holds the same K/V on each of them."""
    for pp_stage in range(shape.pp_size):
        holders: dict[int, list[int]] = {}
        for c in range(shape.cp_size):
            for g in kv_groups_of(c, shape.cp_size, cfg.num_query_groups):
                holders.setdefault(g, []).append(c)
        for g, cps in holders.items():
            reads = [results[shape.rank_of(pp_stage, c)]["pool"] for c in cps]
            idx = [list(kv_groups_of(c, shape.cp_size, cfg.num_query_groups)).index(g) for c in cps]
            for layer in range(len(reads[0])):
                for other, i in zip(reads[1:], idx[1:]):
                    assert torch.equal(other[layer][0][:, i], reads[0][layer][0][:, idx[0]])
                    assert torch.equal(other[layer][1][:, i], reads[0][layer][1][:, idx[0]])
