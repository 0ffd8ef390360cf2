"""A packed two-forward case for the distributed DiT tests, and the per-rank worker.

The case (magi-tiny DiT, float32): three jobs laid out in one KV pool the way the engine does
(:mod:`cluster.engine.kv_layout`): job A (8x8 latents, 32 tokens per chunk) with a ring of 2
clean chunks, its persisted window of 3 chunks, its text-branch window (keys = ring part +
own window part) and its unconditional branch (each chunk over itself); job B (6x10, 30
tokens per chunk) with a ring of 1 chunk and a window of 2; job C (6x6, 1 frame, 9 tokens per
chunk, distilled) with a ring of 1 and a window of 3; captions of different lengths, one empty.
The pool starts with random K/V everywhere (the rings' history). Forward 1 writes every
window's K/V; then the ring keys of job A are re-based in time (``RopeShift``); forward 2 runs
windows that read K/V forward 1 wrote (without rewriting them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.config import load_preset
from stages.dit.kv_pool import KVPool
from stages.dit.packed import PackedWindow

BLOCK, BLOCKS = 16, 28  # pool of 448 tokens
SHIFT_SPAN = (0, 64)  # job A's ring, re-based between the forwards


def tiny_cfg():
    return load_preset("magi-tiny").dit


def _window(gen, cfg, hw, frames, keys, dest, captions, segments, distill=False) -> PackedWindow:
    k = len(dest)
    y_mask = torch.zeros(k, cfg.caption_max_length, dtype=torch.int64)
    for i, n in enumerate(captions):
        y_mask[i, :n] = 1
    return PackedWindow(
        x=torch.randn(16, k * frames, *hw, generator=gen), t=torch.rand(k, generator=gen),
        y=torch.randn(k, cfg.caption_max_length, cfg.caption_channels, generator=gen), y_mask=y_mask,
        caption_dropout=torch.arange(k) % 2 == 1, key_ranges=keys, kv_dest=dest, segments=segments,
        distill_dt=torch.full((k,), 2.0) if distill else None,
    )


def _causal(base: int, tpc: int, first: int, n: int, reach: list[int]) -> list[list[tuple[int, int]]]:
    """Keys of chunks first..first+n-1 of a [ring | window] area at ``base``: ``reach[i]`` chunks ending at itself."""
    return [[(base + max(0, first + i - reach[i] + 1) * tpc, base + (first + i + 1) * tpc)] for i in range(n)]


def windows_1(cfg) -> list[PackedWindow]:
    gen = torch.Generator().manual_seed(11)
    a_main, a_text, a_unc = 0, 160, 256  # job A: main = ring 2 + window 3 (tpc 32)
    text_keys = []  # text branch: the ring part from main, the window part from its own area
    for i, r in enumerate([4, 3, 2]):
        ring_from = max(0, 2 + i - r + 1)
        text_keys.append([(a_main + ring_from * 32, a_main + 64)] * (ring_from < 2)
                         + [(a_text + max(0, i - r + 1) * 32, a_text + (i + 1) * 32)])
    return [
        _window(gen, cfg, (8, 8), 2, _causal(a_main, 32, 2, 3, [4, 3, 2]), [64, 96, 128], [7, 0, 12], ((3, 4),)),
        _window(gen, cfg, (8, 8), 2, text_keys, [160, 192, 224], [7, 5, 12], ((3, 4),)),
        _window(gen, cfg, (8, 8), 2, [[(a_unc, a_unc + 32)], [(a_unc + 32, a_unc + 64)]], [256, 288], [64, 64],
                ((1, 0), (1, 0))),
        _window(gen, cfg, (6, 10), 2, _causal(320, 30, 1, 2, [2, 2]), [350, 380], [3, 9], ((2, 2),)),
        _window(gen, cfg, (6, 6), 1, _causal(410, 9, 1, 3, [3, 3, 2]), [419, 428, 437], [20, 1, 4], ((3, 1),),
                distill=True),
    ]


def windows_2(cfg) -> list[PackedWindow]:
    """Windows reading K/V that forward 1 wrote (main chunk 2 of A, chunk 1 of B, chunks 1-2 of C)."""
    gen = torch.Generator().manual_seed(12)
    return [
        _window(gen, cfg, (8, 8), 2, _causal(0, 32, 3, 2, [3, 2]), [96, 128], [30, 2], ((2, 6),)),
        _window(gen, cfg, (6, 10), 2, _causal(320, 30, 2, 1, [2]), [380], [10], ((1, 4),)),
        _window(gen, cfg, (6, 6), 1, _causal(410, 9, 3, 1, [3]), [437], [6], ((1, 3),), distill=True),
        _window(gen, cfg, (8, 8), 2, [[(256, 288)]], [256], [64], ((1, 0),)),
    ]


def history(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random full K/V of the whole pool (all layers, all KV groups)."""
    gen = torch.Generator().manual_seed(5)
    shape = (BLOCK * BLOCKS, cfg.num_query_groups, cfg.kv_channels)
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(cfg.num_layers)]


def make_pool(cfg, num_layers: int, num_groups: int) -> KVPool:
    return KVPool(num_layers=num_layers, num_blocks=BLOCKS, block_tokens=BLOCK, num_groups=num_groups,
                  head_dim=cfg.kv_channels)


@torch.no_grad()
def run_case(forward, cfg, pool: KVPool, place, shift) -> dict:
    """Prefill ``pool`` with ``place(history)``, forward 1, re-base A's ring keys with ``shift``,
    forward 2, each ``forward(windows, pool)``. Returns the velocities (or None) and the pool
    contents."""
    pool.write(0, place(history(cfg)))
    v1 = forward(windows_1(cfg), pool)
    pool.apply(SHIFT_SPAN[0], SHIFT_SPAN[1] - SHIFT_SPAN[0], shift)
    v2 = forward(windows_2(cfg), pool)
    return {"v1": v1, "v2": v2, "pool": pool.read(0, pool.num_tokens)}


def rank_main(rank: int, shape, init_method: str, ckpt: str, out_dir: str, shift, micro_batches) -> None:
    """One spawned rank: join the mesh, load its shard, run the case, save its results."""
    from stages.dit.weights import load_dit
    from stages.parallel.kv_shards import pool_dims, split_kv
    from stages.parallel.mesh import destroy_mesh, init_mesh
    from stages.parallel.pipeline import pipeline_forward, shard_model

    torch.set_num_threads(1)
    cfg = tiny_cfg()
    mesh = init_mesh(shape, rank, init_method, "gloo", 60, num_query_groups=cfg.num_query_groups,
                     num_layers=cfg.num_layers, micro_batches=micro_batches, num_attention_heads=cfg.num_attention_heads)
    try:
        dit = shard_model(load_dit(Path(ckpt), cfg, layers=mesh.layers), mesh)
        pool = make_pool(cfg, *pool_dims(cfg, mesh))
        out = run_case(lambda windows, kv: pipeline_forward(dit, mesh, windows, kv), cfg, pool,
                       lambda full: split_kv(full, shape, rank, cfg), shift)
        out["layers"] = list(mesh.layers)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy_mesh(mesh)
