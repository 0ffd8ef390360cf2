"""Load: N concurrent SDK clients on a local service, retrying refused jobs as the service says.

    PYTHONPATH=.:proto python bench/load.py [--clients 32] [--chunks 1] [--steps 4] [--config FILE]

A local Ray + Serve instance on loopback (magi-tiny by default) first runs one job
alone (after a warm-up job), then N clients submit one job each at the same moment.
Every client uses the SDK's RetryPolicy: a job refused with RESOURCE_EXHAUSTED is
resubmitted after the delay of the status's google.rpc.RetryInfo (spread by the
service, cluster.serve.retry). Printed, measured at the clients:

    attempts per completed job = Generate calls / jobs done   (goal <= 1.5 at N = 32)
    TTFC  = first chunk - first call of the job    (seconds, retry waits included)
    total = Done - first call of the job           (seconds)

as p50 / p95 over the N jobs and as ratios to the lone job. The engine admits
``engine.max_active_jobs`` jobs and queues ``engine.queue_limit`` more; the rest are
refused. Not a test: it prints.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "proto")]

from cluster.client.sdk import MagiClient, RetryPolicy, make_request  # noqa: E402
from cluster.config import ServiceConfig  # noqa: E402


@dataclass
class JobResult:
    attempts: int
    ttfc: float | None  # None: the job failed
    total: float | None
    error: str = ""


def run_job(client: MagiClient, request, start: threading.Barrier | None = None) -> JobResult:
    """One job to its end through ``client`` (after ``start`` releases all clients at once)."""
    if start is not None:
        start.wait()
    stream = client.generate(request)
    try:
        for _ in stream:
            pass
    except Exception as exc:  # noqa: BLE001  (reported, the benchmark goes on)
        return JobResult(stream.attempts, None, None, f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    return JobResult(stream.attempts, stream.first_chunk_at - stream.started_at, end - stream.started_at)


def run_clients(address: str, request, clients: int, policy: RetryPolicy) -> list[JobResult]:
    """``clients`` threads, one MagiClient (own channel) and one job each, started together."""
    results: list[JobResult | None] = [None] * clients
    start = threading.Barrier(clients)

    def one(i: int) -> None:
        with MagiClient(address, retry=policy) as client:
            results[i] = run_job(client, request, start)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(lone: JobResult, results: list[JobResult], cfg: ServiceConfig, args) -> None:
    done = [r for r in results if r.ttfc is not None]
    attempts = sum(r.attempts for r in results)
    print(f"\nmodel {cfg.model}, {args.chunks} chunk(s), steps {args.steps or 'default'}; engine admits "
          f"{cfg.engine.max_active_jobs}, queues {cfg.engine.queue_limit}; {args.clients} clients")
    print(f"jobs done {len(done)} / {len(results)}, Generate calls {attempts}, "
          f"attempts per completed job {attempts / max(len(done), 1):.2f} (goal <= 1.5)")
    print(f"jobs per number of attempts {_histogram(results)}")
    for r in results:
        if r.error:
            print(f"  failed after {r.attempts} attempt(s): {r.error}")
    if not done:
        return
    print(f"{'':<12}{'lone':>9}{'p50':>9}{'p95':>9}{'p50/lone':>10}{'p95/lone':>10}")
    for name in ("ttfc", "total"):
        base = getattr(lone, name)
        values = [getattr(r, name) for r in done]
        p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
        print(f"{name + ' s':<12}{base:>9.2f}{p50:>9.2f}{p95:>9.2f}{p50 / base:>10.1f}{p95 / base:>10.1f}")


def _histogram(results: list[JobResult]) -> dict[int, int]:
    return dict(sorted(Counter(r.attempts for r in results).items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="0 = model default")
    parser.add_argument("--max-attempts", type=int, default=50, help="Generate calls per job at most")
    parser.add_argument("--config", type=Path, help="ServiceConfig / ray_serve.yaml (default: defaults)")
    args = parser.parse_args(argv)
    cfg = ServiceConfig.from_yaml(args.config) if args.config else ServiceConfig()
    request = make_request("a red fox running through fresh snow", num_chunks=args.chunks,
                           num_steps=args.steps, seed=1)
    policy = RetryPolicy(max_attempts=args.max_attempts)

    from cluster.client.local import LocalService

    with LocalService(cfg, quiet=True) as svc, MagiClient(svc.address, retry=policy) as client:
        run_job(client, request)  # warm-up (lazy imports, first forward)
        lone = run_job(client, request)
        results = run_clients(svc.address, request, args.clients, policy)
    report(lone, results, cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
