"""Continuous batching and batched guidance: throughput of the DiT engine on magi-tiny (CPU).

1. Jobs: 4 concurrent jobs (T2V with different seeds/prompts, one I2V) batched into one
   forward per engine step (``max_active_jobs=4``) vs the same 4 run one after another
   (``max_active_jobs=1``: the queue feeds them in turn); also batched with a per-forward
   token budget of one job's step (``max_forward_tokens``: all jobs still advance every
   step, in forwards of bounded size). Prints chunks/s, the ratios, and each job's TTFC /
   TPOC (TPOC = mean time between its consecutive chunks; in the sequential run a job's
   TTFC includes the jobs before it).
2. Guidance: one CFG-3 job with the three branches packed into one forward (``batch_cfg``)
   vs one forward per branch; prints the time ratio.
Outputs of the batched and sequential runs are compared (max abs diff; 0 expected). Each
configuration runs ``--repeats`` times interleaved and the median is reported.

    PYTHONPATH=.:proto .venv/bin/python bench/batching.py [--chunks 4] [--repeats 3] [--size 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

from cluster.engine import Engine  # noqa: E402
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, PromptSegment  # noqa: E402
from stages.config import magi_tiny  # noqa: E402
from stages.dit.weights import load_dit, write_tiny_checkpoint  # noqa: E402


def _jobs(cfg, chunks: int, size: int) -> list[EngineJob]:
    jobs = []
    for i in range(4):
        gen = torch.Generator().manual_seed(100 + i)
        mask = torch.zeros(cfg.dit.caption_max_length, dtype=torch.int64)
        mask[: 6 + 3 * i] = 1
        cap = CaptionEmbedding(torch.randn(cfg.dit.caption_max_length, cfg.dit.caption_channels, generator=gen), mask)
        prefix = torch.randn(16, 1, size // 8, size // 8, generator=gen) if i == 3 else None  # one I2V job
        spec = JobSpec(job_id=f"job{i}", prompt_segments=(PromptSegment(0, f"p{i}"),), num_chunks=chunks, height=size,
                       width=size, seed=i, num_steps=cfg.sampling.num_steps)
        jobs.append(EngineJob(spec, ((0, cap),), prefix_latent=prefix))
    return jobs


def _run(engine: Engine, jobs: list[EngineJob]) -> tuple[float, dict, dict]:
    handles = [engine.submit(j) for j in jobs]
    out: dict[str, dict[int, torch.Tensor]] = {}
    start = time.perf_counter()
    while engine.has_work:
        for e in engine.step():
            if isinstance(e, LatentChunk):
                out.setdefault(e.job_id, {})[e.index] = e.latent
    wall = time.perf_counter() - start
    return wall, out, {h.job_id: (h.ttfc_s, h.tpoc_s) for h in handles}


def _diff(a: dict, b: dict) -> float:
    return max((a[j][c] - b[j][c]).abs().max().item() for j in a for c in a[j])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=4, help="chunks per job")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=None, help="video height = width in pixels (default: the preset's)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = magi_tiny()
    size = args.size or cfg.height
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_checkpoint(cfg.dit, Path(tmp), seed=0)
        dit = load_dit(Path(tmp), cfg.dit)
    jobs = _jobs(cfg, args.chunks, size)
    sp = cfg.sampling
    budget = (2 * (sp.window_size + 1) + sp.window_size) * dit.tokens_per_chunk(sp.chunk_width, size // 8, size // 8)
    engines = {"batched": Engine(cfg, dit, max_active_jobs=4), "sequential": Engine(cfg, dit, max_active_jobs=1),
               "budgeted": Engine(cfg, dit, max_active_jobs=4, max_forward_tokens=budget)}
    _run(engines["batched"], jobs[:1])  # warm-up
    walls: dict[str, list[float]] = {k: [] for k in engines}
    results: dict[str, tuple[dict, dict]] = {}
    for _ in range(args.repeats):  # interleaved, so load drift hits both alike
        for name, engine in engines.items():
            wall, out, tt = _run(engine, jobs)
            walls[name].append(wall)
            results[name] = (out, tt)
    n = 4 * args.chunks
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"magi-tiny {size}x{size}, {cfg.sampling.num_steps} steps, CFG {cfg.sampling.cfg_number}, 4 jobs x "
          f"{args.chunks} chunks (3 T2V + 1 I2V), median of {args.repeats}:")
    for name in engines:
        print(f"  {name:10s} {med[name]:7.2f} s  {n / med[name]:6.2f} chunks/s")
        for job_id, (ttfc, tpoc) in results[name][1].items():
            print(f"      {job_id}: TTFC {ttfc:6.2f} s  TPOC {tpoc:6.2f} s")
    print(f"  batched / sequential throughput: {med['sequential'] / med['batched']:.2f}x  "
          f"(max abs diff of the chunks: {_diff(results['batched'][0], results['sequential'][0]):.1e})")
    print(f"  budgeted ({budget} tokens per forward) / sequential throughput: "
          f"{med['sequential'] / med['budgeted']:.2f}x "
          f"(max abs diff {_diff(results['budgeted'][0], results['sequential'][0]):.1e})")

    cfg_engines = {"one forward": Engine(cfg, dit, batch_cfg=True), "per branch": Engine(cfg, dit, batch_cfg=False)}
    one = jobs[0]
    cwalls: dict[str, list[float]] = {k: [] for k in cfg_engines}
    couts = {}
    for _ in range(args.repeats):
        for name, engine in cfg_engines.items():
            wall, out, _ = _run(engine, [one])
            cwalls[name].append(wall)
            couts[name] = out
    cmed = {k: statistics.median(v) for k, v in cwalls.items()}
    print(f"guidance branches (1 job x {args.chunks} chunks): one forward {cmed['one forward']:.2f} s, "
          f"one forward per branch {cmed['per branch']:.2f} s; sequential / batched = "
          f"{cmed['per branch'] / cmed['one forward']:.2f}x (max abs diff {_diff(couts['one forward'], couts['per branch']):.1e})")


if __name__ == "__main__":
    main()
