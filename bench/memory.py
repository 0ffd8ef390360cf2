"""KV memory of long jobs: the engine's bounded KV ring vs the reference's keep-everything cache.

Runs one magi-tiny T2V job (CFG 3, 128x128, the preset's steps) of 4, 16 and 64 chunks, each in
a fresh subprocess so memory peaks do not mix, for two KV policies of the same engine:

* ``ring``: the engine default; the pool holds exactly one job's region (ring + window areas);
* ``ring_split``: the same with ``max_forward_tokens`` = one window (each guidance branch its
  own forward), which bounds a step's activation memory; a job shorter than the window
  (4 chunks < window + clean chunk) never runs a full-size step, so its activation peak is
  lower than a long job's: this mode makes that difference small;
* ``keep_all``: the reference behaviour (every chunk's K/V kept, ``Engine(kv_keep_all=True)``),
  pool sized for the whole job.
Prints per run: KV-pool bytes of the job (peak KV bytes), peak clean-chunk K/V held, peak
process RSS (``resource.getrusage`` high-water mark), wall time; then the 64-chunk / 4-chunk
ratios (target for ``ring``: <= 1.05).

The children run with glibc's ``MALLOC_MMAP_THRESHOLD_=1048576`` (blocks >= 1 MiB are mapped
and unmapped directly) so the RSS high-water mark measures live memory rather than heap
fragmentation, which otherwise adds +-20 MiB of run-to-run noise at this size
(``--default-malloc`` keeps the default allocator; deployments can set the same variable).

    PYTHONPATH=.:proto .venv/bin/python bench/memory.py [--lengths 4 16 64] [--steps 8] [--default-malloc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("ring", "ring_split", "keep_all")
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]


def child(ckpt: str, chunks: int, steps: int, mode: str) -> dict:
    """One job in this process; returns its memory figures."""
    import torch

    from cluster.engine import Engine
    from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, PromptSegment
    from stages.config import magi_tiny
    from stages.dit.weights import load_dit

    torch.set_num_threads(2)
    cfg = magi_tiny()
    dit = load_dit(Path(ckpt), cfg.dit)
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(cfg.dit.caption_max_length, dtype=torch.int64)
    mask[:12] = 1
    cap = CaptionEmbedding(torch.randn(cfg.dit.caption_max_length, cfg.dit.caption_channels, generator=gen), mask)
    spec = JobSpec(job_id=f"{mode}-{chunks}", prompt_segments=(PromptSegment(0, "bench"),), num_chunks=chunks,
                   height=cfg.height, width=cfg.width, seed=3, num_steps=steps)
    job = EngineJob(spec, ((0, cap),))
    keep = mode == "keep_all"
    if mode == "ring_split":
        tpc = dit.tokens_per_chunk(cfg.sampling.chunk_width, cfg.height // 8, cfg.width // 8)
        engine = Engine(cfg, dit, max_active_jobs=1, max_forward_tokens=(cfg.sampling.window_size + 1) * tpc)
    elif keep:
        probe = Engine(cfg, dit, max_active_jobs=1, kv_pool_blocks=1, kv_keep_all=True)
        blocks = probe.preparer.prepare(job).blocks
        del probe
        engine = Engine(cfg, dit, max_active_jobs=1, kv_pool_blocks=blocks, kv_keep_all=True)
    else:
        engine = Engine(cfg, dit, max_active_jobs=1)
    st = engine.submit(job)._st
    held = region = emitted = 0
    start = time.perf_counter()
    while engine.has_work:
        emitted += sum(1 for e in engine.step() if hasattr(e, "latent"))  # latents dropped at once
        if st.ctx.kv is not None:
            held = max(held, st.ctx.kv.held_bytes)
            region = max(region, st.ctx.kv.reserved_bytes)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"mode": mode, "chunks": chunks, "emitted": emitted, "kv_region_bytes": region, "kv_held_bytes": held,
            "pool_bytes": engine.pool.nbytes, "peak_rss_bytes": rss, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the magi-tiny preset's)")
    ap.add_argument("--default-malloc", action="store_true", help="do not set MALLOC_MMAP_THRESHOLD_ in the children")
    ap.add_argument("--child", nargs=4, metavar=("CKPT", "CHUNKS", "STEPS", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        ckpt, chunks, steps, mode = args.child
        print(json.dumps(child(ckpt, int(chunks), int(steps), mode)))
        return
    from cluster.units import format_bytes
    from stages.config import magi_tiny
    from stages.dit.weights import write_tiny_checkpoint

    cfg = magi_tiny()
    steps = args.steps or cfg.sampling.num_steps
    env = dict(os.environ)
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_checkpoint(cfg.dit, Path(tmp), seed=0)
        for mode in MODES:
            for n in args.lengths:
                out = subprocess.run([sys.executable, __file__, "--child", tmp, str(n), str(steps), mode],
                                     capture_output=True, text=True, check=True, env=env)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[(mode, n)] = r
                print(f"{mode:10s} {n:3d} chunks: KV pool of the job {format_bytes(r['kv_region_bytes'], 'MiB', 2, 7)}, "
                      f"clean K/V held at peak {format_bytes(r['kv_held_bytes'], 'MiB', 2, 7)}, "
                      f"peak RSS {format_bytes(r['peak_rss_bytes'], 'MiB', 1, 7)}, {r['wall_s']:.1f} s", flush=True)
    lo, hi = min(args.lengths), max(args.lengths)
    malloc = "default malloc" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=1MiB"
    print(f"\nmagi-tiny {cfg.height}x{cfg.width}, {steps} steps, CFG {cfg.sampling.cfg_number}, {malloc}; "
          f"ratios {hi} / {lo} chunks:")
    for mode in MODES:
        a, b = results[(mode, lo)], results[(mode, hi)]
        print(f"  {mode:10s} peak KV bytes {b['kv_region_bytes'] / a['kv_region_bytes']:.3f}   "
              f"peak RSS {b['peak_rss_bytes'] / a['peak_rss_bytes']:.3f}")


if __name__ == "__main__":
    main()
