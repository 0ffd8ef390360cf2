"""The DiTEngine deployment's Prometheus metrics, as Ray exports them (issue 4 point 7, issue 10.5).

Scrapes the local Ray node's metrics export port (Prometheus text format, served by Ray's
metrics agent on the node's address, loopback here) and parses it with prometheus_client's
parser. Ray reports metrics periodically, so the test polls until the job's values arrive.
"""

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.client.sdk import make_request
from serve_helpers import poll

pytestmark = pytest.mark.serve

PREFIX = "ray_magi_engine_"
GAUGES = ("active_jobs", "queued_jobs", "paused_jobs", "kv_pool_used_bytes", "kv_pool_bytes", "kv_pool_used_blocks")
HISTOGRAMS = ("step_seconds", "ttfc_seconds", "tpoc_seconds")


def scrape() -> dict[str, float]:
    """Sample name (prefix dropped) -> value of the DiTEngine's magi_engine_* samples, summed over
    the node's replicas and histogram buckets."""
    import ray

    values: dict[str, float] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(PREFIX) and sample.labels.get("deployment") == "DiTEngine":
                    if sample.name.endswith("_bucket"):
                        continue
                    name = sample.name[len(PREFIX):]
                    values[name] = values.get(name, 0.0) + sample.value
    return values


def chunks_produced(values: dict[str, float]) -> float:
    return values.get("chunks_produced_total", values.get("chunks_produced", 0.0))


def test_engine_metrics_reach_prometheus_after_a_job(run_job, service):
    before = scrape()
    job = run_job(make_request("a lighthouse at dusk", num_chunks=2, num_steps=4, height=32, width=48))
    assert job.done.num_chunks == 2

    def exported():
        now = scrape()
        grown = chunks_produced(now) - chunks_produced(before) >= job.done.num_chunks
        counted = all(now.get(f"{h}_count", 0) > before.get(f"{h}_count", 0) for h in HISTOGRAMS)
        return now if grown and counted and all(g in now for g in GAUGES) else None

    after = poll(exported, timeout_s=90.0)
    assert after is not None, f"Ray did not export the job's metrics: {scrape()}"
    assert all(after[f"{h}_sum"] > 0 for h in HISTOGRAMS)
    assert [g for g in GAUGES if g not in after] == [], sorted(after)
    assert after["kv_pool_bytes"] > 0 and 0 <= after["kv_pool_used_bytes"] <= after["kv_pool_bytes"]
