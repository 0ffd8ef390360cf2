"""The DiTEngine deployment exports the engine's Prometheus metrics (issue 4 point 7)."""

import pytest

from cluster.client.sdk import make_request

pytestmark = pytest.mark.serve


def test_engine_metrics_after_a_job(run_job, dit_engine):
    before = dit_engine.metrics.remote().result()
    job = run_job(make_request("a lighthouse at dusk", num_chunks=2, num_steps=4, height=32, width=48))
    assert job.done.num_chunks == 2
    after = dit_engine.metrics.remote().result()

    assert after["chunks_produced"] - before["chunks_produced"] >= 2
    counts, old = after["histogram_counts"], before["histogram_counts"]
    assert counts["step_seconds"] > old["step_seconds"]
    assert counts["ttfc_seconds"] > old["ttfc_seconds"]
    assert counts["tpoc_seconds"] > old["tpoc_seconds"]
    assert all(after["histogram_sums"][k] > 0 for k in counts)
    gauges = after["gauges"]
    assert gauges["kv_pool_bytes"] > 0
    assert 0 <= gauges["kv_pool_used_bytes"] <= gauges["kv_pool_bytes"]
    assert set(gauges) == {"active_jobs", "queued_jobs", "kv_pool_used_bytes", "kv_pool_bytes", "kv_pool_used_blocks"}
