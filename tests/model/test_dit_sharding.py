"""In-process parts of the distributed DiT: mesh bookkeeping and validation, KV shard
merge/split, chunk-aligned micro-batches, pipeline-stage-only weight loading, the pipeline forward
of a one-rank mesh (the model holds no mesh), picklable RoPE re-basing.
(The multi-process forwards are in test_dit_parallel.py.)"""

from __future__ import annotations

import pickle

import pytest
import torch

from stages.dit.packed import PackedWindow
from stages.dit.step import AbsentLayer
from stages.dit.weights import load_dit, write_tiny_checkpoint
from stages.parallel.kv_shards import merge_kv_reads, pool_dims, split_kv
from stages.parallel.mesh import MeshShape, build_mesh, init_mesh, kv_groups_of
from stages.parallel.pipeline import chunk_spans, pipeline_forward, shard_model, split_micro_batches
from tests.model.parallel_cases import make_pool, run_case, tiny_cfg, windows_1


def test_mesh_places_ranks_layers_and_kv_groups():
    shape = MeshShape(cp_size=2, pp_size=2)
    assert shape.world_size == 4 and shape.result_rank == 2
    assert [(shape.pp_stage_of(r), shape.cp_rank_of(r)) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    mesh = build_mesh(shape, 3, num_query_groups=2, num_layers=4)
    assert (mesh.pp_stage, mesh.cp_rank, mesh.layers, mesh.kv_groups) == (1, 1, range(2, 4), range(1, 2))
    assert mesh.is_last_pp_stage and not mesh.is_first_pp_stage and mesh.micro_batches == 4
    assert build_mesh(MeshShape(cp_size=2), 0, num_query_groups=2, num_layers=2).micro_batches == 1
    # sharded when cp <= G, replicated when cp > G (rank r holds the group of its query heads)
    assert [kv_groups_of(c, 2, 8) for c in range(2)] == [range(0, 4), range(4, 8)]
    assert [kv_groups_of(c, 4, 2) for c in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert pool_dims(tiny_cfg(), mesh) == (2, 1) and pool_dims(tiny_cfg(), None) == (2, 2)


@pytest.mark.parametrize("kw,field", [
    (dict(shape=MeshShape(cp_size=3), num_query_groups=2, num_layers=2), "cp_size"),
    (dict(shape=MeshShape(pp_size=3), num_query_groups=2, num_layers=4), "pp_size"),
    (dict(shape=MeshShape(pp_size=4), num_query_groups=2, num_layers=2), "pp_size"),
    (dict(shape=MeshShape(pp_size=2), num_query_groups=2, num_layers=2, micro_batches=0), "micro_batches"),
])
def test_bad_meshes_are_refused_before_joining(kw, field):
    with pytest.raises(ValueError, match=field):
        init_mesh(rank=0, init_method="tcp://127.0.0.1:1", **kw)
    with pytest.raises(ValueError, match="cp_size"):
        init_mesh(MeshShape(cp_size=8), 0, "tcp://127.0.0.1:1", num_query_groups=2, num_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match="cp_size"):
        MeshShape(cp_size=0)


@pytest.mark.parametrize("cp,pp", [(2, 1), (4, 1), (1, 2), (2, 2)])
def test_split_then_merge_gives_back_the_full_kv(cp, pp):
    cfg, shape = tiny_cfg(), MeshShape(cp_size=cp, pp_size=pp)
    full = [(torch.randn(5, 2, 64), torch.randn(5, 2, 64)) for _ in range(cfg.num_layers)]
    parts = [split_kv(full, shape, r, cfg) for r in range(shape.world_size)]
    for r, part in enumerate(parts):
        mesh = build_mesh(shape, r, num_query_groups=2, num_layers=2)
        assert len(part) == len(mesh.layers) and part[0][0].shape == (5, len(mesh.kv_groups), 64)
        assert all(k.is_contiguous() for k, _ in part)
    merged = merge_kv_reads(parts, shape, cfg)
    assert all(torch.equal(a, b) for (mk, mv), (fk, fv) in zip(merged, full) for a, b in ((mk, fk), (mv, fv)))
    with pytest.raises(ValueError, match="ranks"):
        merge_kv_reads(parts[:-1], shape, cfg)


def _spans(reads_dest: list[tuple[list[tuple[int, int]], int]], tpc: int = 10):
    k = len(reads_dest)
    w = PackedWindow(x=torch.zeros(16, k, 2, 2), t=torch.zeros(k), y=torch.zeros(k, 1, 1), y_mask=torch.ones(k, 1),
                     caption_dropout=torch.zeros(k, dtype=torch.bool), key_ranges=[r for r, _ in reads_dest],
                     kv_dest=[d for _, d in reads_dest])
    return chunk_spans([w], [tpc])


def test_micro_batches_are_chunk_aligned_balanced_and_never_read_ahead():
    cfg = tiny_cfg()
    wins = windows_1(cfg)
    spans = chunk_spans(wins, [32, 32, 32, 30, 9])
    for count in (1, 2, 3, 4):
        mbs = split_micro_batches(spans, count)
        assert len(mbs) == count and mbs[0][0] == 0 and mbs[-1][1] == len(spans)
        assert all(a < b and b == c for (a, b), (c, _) in zip(mbs, mbs[1:] + [(mbs[-1][1], 0)]))
        sizes = [spans[b - 1].end - spans[a].start for a, b in mbs]
        assert max(sizes) - min(sizes) <= 64, sizes  # within two chunks of each other
    # chunk 0 reads the keys chunk 2 writes (30..40): no cut before 1 or 2; cut before 3 is fine
    ahead = _spans([([(0, 10), (30, 40)], 0), ([(10, 20)], 10), ([(20, 30)], 30), ([(40, 50)], 40)])
    assert split_micro_batches(ahead, 4) == [(0, 3), (3, 4)]
    # reading one's own and earlier chunks' keys never blocks a cut
    causal = _spans([([(0, 10 * (i + 1))], 10 * i) for i in range(4)])
    assert split_micro_batches(causal, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_micro_batches(causal, 9) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="micro_batches"):
        split_micro_batches(causal, 0)


def test_pp_stage_loading_holds_only_its_layers(tmp_path):
    cfg = tiny_cfg()
    write_tiny_checkpoint(cfg, tmp_path, seed=1)
    full = load_dit(tmp_path, cfg)
    part = load_dit(tmp_path, cfg, layers=range(1, 2))
    assert isinstance(part.videodit_blocks.layers[0], AbsentLayer)
    keys = set(part.state_dict())
    assert not any(k.startswith("videodit_blocks.layers.0.") for k in keys)
    assert keys and all(torch.equal(part.state_dict()[k], full.state_dict()[k]) for k in keys)
    assert keys == {k for k in full.state_dict() if not k.startswith("videodit_blocks.layers.0.")}
    mesh = build_mesh(MeshShape(pp_size=2), 0, num_query_groups=2, num_layers=2)
    with pytest.raises(ValueError, match="not loaded"):
        shard_model(part, mesh)  # pipeline stage 0 needs layer 0
    with pytest.raises(RuntimeError, match="another pipeline stage"):
        part.videodit_blocks.layers[0](torch.zeros(1))


def test_a_pipeline_stage_model_is_a_plain_module(tmp_path):
    """Sharding leaves no mesh in the model: its own forward stays the single-process one
    (which cannot run without the other pipeline stage's layers) instead of dispatching to
    the pipeline; the rank passes its mesh to pipeline_forward."""
    cfg = tiny_cfg()
    write_tiny_checkpoint(cfg, tmp_path, seed=4)
    mesh = build_mesh(MeshShape(pp_size=2), 1, num_query_groups=cfg.num_query_groups, num_layers=cfg.num_layers)
    part = shard_model(load_dit(tmp_path, cfg, layers=mesh.layers), mesh)
    assert not hasattr(part, "mesh") and not hasattr(part, "shard")
    with pytest.raises(RuntimeError, match="another pipeline stage"):
        part.forward_packed(windows_1(cfg), make_pool(cfg, *pool_dims(cfg, mesh)))


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_one_rank_pipeline_forward_equals_the_model_forward(micro_batches, tmp_path):
    """A one-rank mesh needs no torch.distributed: pipeline_forward(model, mesh, ...) runs in this
    process (micro-batched when asked) and equals the model's own forward (velocities and pool)."""
    cfg = tiny_cfg()
    write_tiny_checkpoint(cfg, tmp_path, seed=5)
    dit = load_dit(tmp_path, cfg)
    shift = dit.rope_shift(2)
    pool_of = lambda: make_pool(cfg, cfg.num_layers, cfg.num_query_groups)  # noqa: E731
    want = run_case(dit.forward_packed, cfg, pool_of(), lambda full: full, shift)
    mesh = build_mesh(MeshShape(), 0, num_query_groups=cfg.num_query_groups, num_layers=cfg.num_layers,
                      micro_batches=micro_batches)
    dit = shard_model(dit, mesh)
    got = run_case(lambda windows, kv: pipeline_forward(dit, mesh, windows, kv), cfg, pool_of(), lambda full: full,
                   shift)
    assert pipeline_forward(dit, mesh, [], pool_of()) == []
    for key in ("v1", "v2"):
        assert len(got[key]) == len(want[key])
        for g, w in zip(got[key], want[key]):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    for (gk, gv), (wk, wv) in zip(got["pool"], want["pool"]):
        torch.testing.assert_close(gk, wk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gv, wv, atol=1e-5, rtol=1e-5)


def test_rope_shift_is_picklable_and_equals_the_model_method(tmp_path):
    cfg = tiny_cfg()
    write_tiny_checkpoint(cfg, tmp_path, seed=2)
    dit = load_dit(tmp_path, cfg)
    k = torch.randn(7, 2, cfg.kv_channels)
    shift = pickle.loads(pickle.dumps(dit.rope_shift(3)))
    assert torch.equal(shift(k), dit.rope_time_shift(k, 3))
    assert not torch.equal(shift(k), k) and torch.equal(dit.rope_shift(0)(k), k)
