"""The DiT engine over a parallel mesh (Ulysses cp_size, pipeline pp_size) vs one process.

The same multi-job workload (``--jobs`` T2V jobs of ``--chunks`` chunks at ``--size`` pixels,
``--steps`` denoising steps; the first half submitted at step 0, the rest at step 3, so jobs
join and leave the batch at different steps) runs on the single-process engine (baseline)
and on meshes cp 2, pp 2 and pp 2 x cp 2 (:func:`cluster.serve.ranks.start_rank_group`:
rank 0 in this process, the other ranks Ray actors of a local Ray, one torch.distributed
group). For each it prints the median engine step time (seconds, every ``Engine.step`` of
every repeat), chunks/s (all chunks / median wall time of a run), the throughput ratio
mesh / baseline (above 1 = faster) and the max |diff| of every produced clean latent vs
the baseline's (correctness beside speed: float32 on CPU 0 to ~1e-6, matmul blocking only;
bf16 on GPU larger). A mesh's runs alternate with baseline runs, and its ratio is against
those baseline runs (load drift on a shared machine hits both alike).

Devices: CPU always (gloo, float32); GPU too (nccl, bfloat16) when CUDA has >= 2 devices,
each mesh only when it has world_size GPUs. Rank 0 takes the first GPU and the Ray actors
the others (``CUDA_VISIBLE_DEVICES`` of the Ray node set to them after this process has
initialised CUDA).

On a CPU machine with few cores the mesh is expected to be SLOWER than one process: every
layer adds an all-to-all (cp) or stage hand-off (pp) through gloo, every engine step a Ray
call per peer, and the ranks share the same cores (each rank gets cores // world_size torch
threads; the baseline all of them). There the figure is the mesh's overhead, which is what
this bench measures on CPU; the speed-up of a mesh needs one device per rank (GPU).

    PYTHONPATH=.:proto .venv/bin/python bench/parallel.py [--model magi-tiny] [--size 128]
        [--jobs 3] [--chunks 4] [--steps 4] [--repeats 3] [--checkpoint DIT_DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

from cluster.client.local import prepare_environment  # noqa: E402
from cluster.config import DeploymentSettings, ParallelSettings  # noqa: E402
from cluster.engine import Engine  # noqa: E402
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, PromptSegment  # noqa: E402
from stages.config import ModelConfig, load_preset  # noqa: E402
from stages.dit.weights import write_tiny_checkpoint  # noqa: E402

MESHES = [(2, 1), (1, 2), (2, 2)]  # (cp_size, pp_size)
LATE_STEP = 3  # engine step at which the second half of the jobs is submitted


def _jobs(cfg: ModelConfig, args) -> list[EngineJob]:
    jobs = []
    for i in range(args.jobs):
        gen = torch.Generator().manual_seed(100 + i)
        mask = torch.zeros(cfg.dit.caption_max_length, dtype=torch.int64)
        mask[: 5 + 3 * i] = 1
        cap = CaptionEmbedding(torch.randn(cfg.dit.caption_max_length, cfg.dit.caption_channels, generator=gen), mask)
        spec = JobSpec(job_id=f"job{i}", prompt_segments=(PromptSegment(0, f"p{i}"),), num_chunks=args.chunks,
                       height=args.size, width=args.size, seed=i, num_steps=args.steps)
        jobs.append(EngineJob(spec, ((0, cap),)))
    return jobs


def _run(engine: Engine, jobs: list[EngineJob], sync) -> tuple[float, list[float], dict]:
    """Drain ``engine`` with ``jobs`` (half at step 0, half at LATE_STEP): (wall s, step times s, latents)."""
    early, late = jobs[: (len(jobs) + 1) // 2], jobs[(len(jobs) + 1) // 2:]
    out: dict[str, dict[int, torch.Tensor]] = {}
    steps: list[float] = []
    start = time.perf_counter()
    for job in early:
        engine.submit(job)
    while engine.has_work or (late and len(steps) < LATE_STEP):
        if len(steps) == LATE_STEP:
            for job in late:
                engine.submit(job)
        t0 = time.perf_counter()
        events = engine.step()
        sync()
        steps.append(time.perf_counter() - t0)
        for e in events:
            if isinstance(e, LatentChunk):
                out.setdefault(e.job_id, {})[e.index] = e.latent.float().cpu()
    return time.perf_counter() - start, steps, out


class Runs:
    """Measured runs of one engine: step times and wall times (seconds), the last run's latents."""

    def __init__(self, engine: Engine, threads: int, sync):
        self.engine, self.threads, self.sync = engine, threads, sync
        self.steps: list[float] = []
        self.walls: list[float] = []
        self.latents: dict[str, dict[int, torch.Tensor]] = {}

    def run(self, jobs: list[EngineJob], record: bool = True) -> None:
        torch.set_num_threads(self.threads)  # a mesh's rank 0 shares the cores with its peers
        wall, steps, out = _run(self.engine, jobs, self.sync)
        if record:
            self.walls.append(wall)
            self.steps += steps
            self.latents = out

    def row(self, name: str, chunks: int, base_walls: list[float], base: dict | None) -> str:
        wall = statistics.median(self.walls)
        diff = "-" if base is None else f"{_max_diff(self.latents, base):.1e}"
        return (f"  {name:14s} {statistics.median(self.steps):9.4f} {chunks / wall:9.2f} "
                f"{statistics.median(base_walls) / wall:9.2f}x {diff:>11s}")


def _max_diff(got: dict, want: dict) -> float:
    if got.keys() != want.keys() or any(got[j].keys() != want[j].keys() for j in want):
        raise RuntimeError("the mesh produced other chunks than the baseline")
    return max((got[j][c] - want[j][c]).abs().max().item() for j in want for c in want[j])


def _mesh_engine(cfg, ckpt: Path, mesh: tuple[int, int], device: str, dtype: str, threads: int, jobs: int) -> Engine:
    from cluster.serve.ranks import start_rank_group  # noqa: PLC0415 (imports Ray)

    cp, pp = mesh
    settings = DeploymentSettings(num_cpus=0, num_gpus=1 if device.startswith("cuda") else 0)
    group = start_rank_group(ParallelSettings(cp_size=cp, pp_size=pp, init_timeout_s=120), settings, cfg, str(ckpt),
                             device=device, dtype=dtype, torch_threads=threads)
    return Engine.from_checkpoint(cfg, ckpt, ranks=group, max_active_jobs=jobs)


def _bench_device(label: str, cfg, ckpt: Path, args, device: str, dtype: str, meshes: list, cores: int) -> None:
    """Baseline then each mesh; a mesh's runs alternate with baseline runs (load drift hits
    both alike) and its ratio is against those baseline runs."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    jobs = _jobs(cfg, args)
    base = Runs(Engine.from_checkpoint(cfg, ckpt, device=device, dtype=getattr(torch, dtype),
                                       max_active_jobs=args.jobs), cores, sync)
    base.run(jobs[:1], record=False)  # warm-up: one job
    for _ in range(args.repeats):
        base.run(jobs)
    n = args.jobs * args.chunks
    rows = []
    for cp, pp in meshes:
        name = f"cp {cp} x pp {pp}"
        threads = max(1, cores // (cp * pp))
        torch.set_num_threads(threads)
        try:
            engine = _mesh_engine(cfg, ckpt, (cp, pp), device, dtype, threads, args.jobs)
        except ValueError as err:  # a mesh the model cannot be split into
            rows.append(f"  {name:14s} skipped: {err}")
            continue
        mesh, paired = Runs(engine, threads, sync), len(base.walls)
        try:
            mesh.run(jobs[:1], record=False)
            for _ in range(args.repeats):
                mesh.run(jobs)
                base.run(jobs)
        finally:
            engine.close()
        rows.append(mesh.row(name, n, base.walls[paired:], base.latents))
    print(f"{label}: {cfg.name} {args.size}x{args.size}, {args.steps} steps, {args.jobs} jobs x {args.chunks} chunks "
          f"(max_active_jobs {args.jobs}), median of {args.repeats} runs per mesh")
    print(f"  {'mesh':14s} {'step (s)':>9s} {'chunks/s':>9s} {'vs single':>10s} {'max |diff|':>11s}")
    print(base.row("single", n, base.walls, None))
    print("\n".join(rows))
    print("  (vs single: median baseline wall / median mesh wall, over the baseline runs interleaved with that mesh)")
    torch.set_num_threads(cores)


def _init_gpus() -> int:
    """CUDA devices to bench on (0 or >= 2). With >= 2, this process (rank 0) initialises CUDA
    on the first; the Ray node then sees only the others, one per actor rank."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    torch.zeros(1, device="cuda")  # CUDA context on ids[0] before the variable changes
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[1:count])
    return count


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="magi-tiny", help="model preset (stages.config.PRESETS)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="DiT checkpoint folder (default: random weights written to a temporary folder)")
    ap.add_argument("--size", type=int, default=128, help="video height = width, pixels (multiple of 16)")
    ap.add_argument("--jobs", type=int, default=3, help="concurrent jobs (max_active_jobs)")
    ap.add_argument("--chunks", type=int, default=4, help="chunks per job")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per chunk")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per engine (after one warm-up job)")
    args = ap.parse_args()
    for name in ("size", "jobs", "chunks", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main() -> None:
    args = _parse()
    try:
        cfg = load_preset(args.model)
    except KeyError as err:
        sys.exit(f"--model: {err}")
    step = cfg.vae_spatial_factor * cfg.dit.patch_size
    if args.size % step:
        sys.exit(f"--size: {args.size} is not a multiple of {step} (vae_spatial_factor x patch_size)")
    cfg = cfg.model_copy(update={"height": args.size, "width": args.size})  # KV pool planned for this size
    window = cfg.sampling.window_size
    if args.steps % window:
        sys.exit(f"--steps: {args.steps} is not a multiple of window_size {window}")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        sys.exit(f"--checkpoint: no such folder {args.checkpoint}")
    cores = os.cpu_count() or 1
    gpus = _init_gpus()
    prepare_environment()  # auth off, PYTHONPATH for the actors (before ray.init)
    import ray  # noqa: PLC0415

    ray.init(num_cpus=cores, num_gpus=max(gpus - 1, 0), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level=logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = args.checkpoint or Path(tmp)
            if args.checkpoint is None:
                write_tiny_checkpoint(cfg.dit, ckpt, seed=0)
            _bench_device("CPU (gloo, float32)", cfg, ckpt, args, "cpu", "float32", MESHES, cores)
            if gpus:
                meshes = [m for m in MESHES if m[0] * m[1] <= gpus]
                _bench_device(f"GPU x{gpus} (nccl, bfloat16)", cfg, ckpt, args, "cuda", "bfloat16", meshes, cores)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
