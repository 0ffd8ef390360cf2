"""Bounded KV pool: fixed storage, regions handed out and returned, ring output == keep-everything."""

from __future__ import annotations

import pytest
import torch

from cluster.engine import Engine
from cluster.scheduler.kv_areas import kv_areas
from stages.config import magi_tiny
from stages.dit.kv_pool import KVPool
from stages.errors import InvalidInput
from tests.model.engine_fixtures import make_job, max_diff, run_alone, tiny  # noqa: F401 (fixture)


def test_pool_regions_first_fit_merge_and_copy():
    pool = KVPool(num_layers=2, num_blocks=6, block_tokens=3, num_groups=2, head_dim=4)
    assert pool.nbytes == 6 * 3 * pool.token_bytes and pool.token_bytes == 2 * 2 * 2 * 4 * 4
    a, b, c = pool.alloc(2), pool.alloc(2), pool.alloc(2)
    assert (a.start, b.start, c.start) == (0, 6, 12) and pool.alloc(1) is None and pool.free_blocks == 0
    pool.release(b)
    assert not pool.can_alloc(3) and pool.alloc(3) is None
    pool.release(a)  # merges with b's blocks into one run of 4
    d = pool.alloc(4)
    assert d.start == 0 and pool.free_blocks == 0
    pool.release(c)
    with pytest.raises(ValueError, match="already free"):
        pool.release(c)
    kv = [(torch.full((3, 2, 4), float(i)), torch.full((3, 2, 4), -float(i))) for i in range(2)]
    pool.write(3, kv)
    pool.move(3, 4, 3)  # overlapping move
    got = pool.read(4, 3)
    assert torch.equal(got[1][0], kv[1][0]) and torch.equal(got[0][1], kv[0][1])
    storage = [t.data_ptr() for layer in range(2) for t in pool.layer(layer)]
    pool.release(d)
    assert pool.free_blocks == 6 and storage == [t.data_ptr() for layer in range(2) for t in pool.layer(layer)]


def test_job_region_does_not_grow_with_length(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit)
    short = engine.preparer.prepare(make_job("s", 4, 1))
    long = engine.preparer.prepare(make_job("l", 64, 1))
    endless = engine.preparer.prepare(make_job("e", None, 1))
    assert short.areas == long.areas == endless.areas and short.blocks == long.blocks == endless.blocks
    sp = cfg.sampling
    ring = short.areas.history - (sp.window_size + 1)  # clean chunks kept below a full window + its clean chunk
    assert ring <= max(sp.noise2clean_kvrange) - 1
    keep_all = kv_areas(long.sched.spec, sp.cfg_number, keep_all=True)
    assert keep_all.history == 64 > short.areas.history


@pytest.mark.parametrize("steps", [4, 8])
def test_ring_equals_keep_everything_bitwise(tiny, steps):
    """Same keys attended in the same order: max abs diff 0 against the reference-style cache."""
    cfg, dit = tiny
    ring = Engine(cfg, dit, max_active_jobs=1)
    job = make_job("j", 7, seed=4, steps=steps)
    st = ring.submit(job)._st
    held, moves = [], 0
    out_ring = {}
    while ring.has_work:
        for e in ring.step():
            if hasattr(e, "latent"):
                out_ring[e.index] = e.latent
        if st.ctx.kv is not None:
            held.append(len(st.ctx.kv.chunks))
            moves = st.ctx.kv.ring.moves
    full = Engine(cfg, dit, kv_keep_all=True, kv_pool_blocks=64)
    fst = full.submit(job)._st
    keep = {}
    kept = 0
    while full.has_work:
        for e in full.step():
            if hasattr(e, "latent"):
                keep[e.index] = e.latent
        kept = max(kept, 0 if fst.ctx.kv is None else len(fst.ctx.kv.chunks))
    assert max_diff(out_ring, keep) == 0.0
    assert max(held) <= max(cfg.sampling.noise2clean_kvrange) - 1 and kept >= 5  # keep-all: every clean chunk so far
    assert moves == 0  # shipped KV ranges: clean K/V are written in place and never copied
    assert ring.pool.free_blocks == ring.pool.num_blocks  # region returned when the job finished


def test_v2v_prefix_ring_moves_and_matches_keep_everything(tiny):
    cfg, dit = tiny
    video = torch.randn(16, 2 * cfg.sampling.chunk_width + 3, 8, 8, generator=torch.Generator().manual_seed(8))
    job = make_job("v", 3, seed=2, prefix=video)
    a = run_alone(Engine(cfg, dit), job)
    b = run_alone(Engine(cfg, dit, kv_keep_all=True, kv_pool_blocks=64), job)
    assert max_diff(a, b) == 0.0


def test_pool_too_small_for_a_job_is_an_invalid_input(tiny):
    cfg, dit = tiny
    engine = Engine(cfg, dit, kv_pool_blocks=1)
    with pytest.raises(InvalidInput) as err:
        engine.submit(make_job("big", 2, 1))
    assert err.value.field == "height"
    assert magi_tiny().sampling.window_size == 4
