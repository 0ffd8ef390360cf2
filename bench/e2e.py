"""End-to-end serving overhead: the same job in-process vs through gRPC + Ray Serve.

    PYTHONPATH=.:proto python bench/e2e.py [--chunks 3] [--steps 0] [--repeats 3]

In-process = the service's own job flow (:class:`cluster.pipeline.Pipeline`) over the
stages and an AsyncEngine loaded in this process (:class:`cluster.pipeline.local.LocalPipeline`),
no Ray, no gRPC. Served = a local Ray + Serve instance (cluster.client.local) and a real
gRPC client, whose ingress runs the same Pipeline over Serve handles. Both overlap the VAE
decode of chunk k with the DiT's work on chunk k+1, so the ratio is the cost of Ray + gRPC
(deployment hops, serialization, the proxy). Both run the same request (magi-tiny by default) after one warm-up
job each, alternating (in-process, served) so that background load on the machine
hits both alike (the idle Ray processes stay up during the in-process runs); the
figures are medians over ``--repeats`` pairs, measured at the caller:

    TTFC  = first chunk available - request start   (seconds)
    TPOC  = mean gap between consecutive chunks     (seconds)
    total = last byte of the job - request start    (seconds)

and the ratio served total / in-process total is the serving overhead. Not a test: it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "proto")]

from cluster.client.sdk import MagiClient, make_request  # noqa: E402
from cluster.config import ServiceConfig  # noqa: E402
from cluster.engine.stats import ttfc_tpoc  # noqa: E402


@dataclass
class Timing:
    ttfc: float
    tpoc: float
    total: float

    @staticmethod
    def from_chunk_times(start: float, chunk_times: list[float], end: float) -> "Timing":
        ttfc, tpoc = ttfc_tpoc(start, chunk_times[0], chunk_times[-1], len(chunk_times))
        return Timing(ttfc, tpoc or 0.0, end - start)


async def _run_local(local, request) -> Timing:
    """One job through the in-process pipeline; chunk times taken as the last part of each arrives."""
    start, chunk_times = time.perf_counter(), []
    async for msg in local.generate(request):
        if msg.HasField("chunk") and msg.chunk.last_part:
            chunk_times.append(time.perf_counter())
    return Timing.from_chunk_times(start, chunk_times, time.perf_counter())


def run_served(client: MagiClient, request) -> tuple[Timing, Timing]:
    """(client-observed timing, server-reported Done timing) of one job through gRPC."""
    start = time.perf_counter()
    chunk_times = []
    stream = client.generate(request)
    for msg in stream:
        if msg.HasField("chunk") and msg.chunk.last_part:
            chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    done = stream.done
    return Timing.from_chunk_times(start, chunk_times, end), Timing(done.ttfc_s, done.tpoc_s, done.total_s)


def median(timings: list[Timing]) -> Timing:
    return Timing(*(statistics.median(getattr(t, k) for t in timings) for k in ("ttfc", "tpoc", "total")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="0 = model default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", type=Path, help="ServiceConfig / ray_serve.yaml (default: defaults)")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="nice level of Ray workers (Ray's default is 15; 0 = the in-process run's level, "
                             "so background load on the machine affects both runs alike)")
    args = parser.parse_args(argv)
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    cfg = ServiceConfig.from_yaml(args.config) if args.config else ServiceConfig()
    request = make_request("a red fox running through fresh snow, cinematic", num_chunks=args.chunks,
                           num_steps=args.steps, seed=1)

    from cluster.client.local import LocalService
    from cluster.pipeline.local import LocalPipeline

    local, loop = LocalPipeline(cfg), asyncio.new_event_loop()
    direct_runs, served_runs = [], []
    try:
        with LocalService(cfg) as svc, MagiClient(svc.address) as client:
            loop.run_until_complete(_run_local(local, request))
            run_served(client, request)
            for _ in range(args.repeats):  # interleaved: background load hits both alike
                direct_runs.append(loop.run_until_complete(_run_local(local, request)))
                served_runs.append(run_served(client, request))
    finally:
        loop.run_until_complete(local.close())
        loop.close()
    direct = median(direct_runs)
    served, server_side = median([r[0] for r in served_runs]), median([r[1] for r in served_runs])

    threads = {k: v.torch_threads for k, v in dict(cfg.deployments).items() if k != "ingress"}
    print(f"\nmodel {cfg.model}, {args.chunks} chunks, steps {args.steps or 'default'}, "
          f"median of {args.repeats} interleaved pairs (after 1 warm-up each); replica torch threads {threads}, "
          f"worker niceness {args.worker_niceness}")
    print(f"{'mode':<28}{'TTFC s':>9}{'TPOC s':>9}{'total s':>9}")
    for name, t in (("in-process (Pipeline)", direct), ("gRPC + Serve (client)", served),
                    ("gRPC + Serve (server Done)", server_side)):
        print(f"{name:<28}{t.ttfc:>9.3f}{t.tpoc:>9.3f}{t.total:>9.3f}")
    print(f"serving overhead, end-to-end total served / in-process: {served.total / direct.total:.2f}x")
    print(f"TTFC served / in-process: {served.ttfc / direct.ttfc:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
