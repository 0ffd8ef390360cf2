"""Prometheus metrics of the DiT engine, exported through Ray Serve's metrics API.

:class:`EngineMetrics` is fed by the ``DiTEngine`` deployment after every engine step
(:meth:`EngineMetrics.after_step`) from :meth:`cluster.engine.Engine.stats` and the step's
events. Ray exports them on each node's metrics endpoint (names prefixed ``ray_``, plus
Serve's deployment / replica / application tags):

======================================  =========  ==================================================
name                                    kind       meaning
======================================  =========  ==================================================
``magi_engine_active_jobs``             gauge      jobs in the engine's batch
``magi_engine_queued_jobs``             gauge      jobs waiting for admission
``magi_engine_paused_jobs``             gauge      active jobs paused (their reader is behind; KV kept)
``magi_engine_kv_pool_used_bytes``      gauge      KV-pool bytes held by jobs
``magi_engine_kv_pool_bytes``           gauge      KV-pool size, bytes
``magi_engine_kv_pool_used_blocks``     gauge      KV-pool blocks held by jobs
``magi_engine_chunks_produced``         counter    clean latent chunks produced
``magi_engine_step_seconds``            histogram  wall time of one engine step (one packed forward)
``magi_engine_ttfc_seconds``            histogram  TTFC: first chunk - submit (queue wait included)
``magi_engine_tpoc_seconds``            histogram  TPOC: gap between consecutive chunks of a job
======================================  =========  ==================================================

Times are seconds (``time.perf_counter``), measured by the engine (:class:`cluster.engine.stats.JobTimings`).
Ray's metrics agent serves them in Prometheus text format on each node's metrics export port
(``ray.nodes()[i]["MetricsExportPort"]``, on the node's address; tests/serve/test_metrics.py
scrapes it).
"""

from __future__ import annotations

from ray.serve import metrics

from cluster.engine.stats import DEFAULT_BUCKETS_S, EngineStats
from cluster.messages import LatentChunk

_GAUGES = {
    "active_jobs": "jobs in the DiT engine's batch",
    "queued_jobs": "jobs waiting for admission to the DiT engine",
    "paused_jobs": "active jobs paused because their reader is behind (KV region kept)",
    "kv_pool_used_bytes": "KV-pool bytes held by jobs",
    "kv_pool_bytes": "KV-pool size in bytes",
    "kv_pool_used_blocks": "KV-pool blocks held by jobs",
}
_HISTOGRAMS = {
    "step_seconds": "wall time of one DiT engine step (one packed forward), seconds",
    "ttfc_seconds": "time to first chunk (submit to first clean latent chunk), seconds",
    "tpoc_seconds": "time per output chunk (gap between consecutive chunks of a job), seconds",
}


class EngineMetrics:
    """The engine's Ray Serve metrics (one set per replica); :meth:`after_step` is an
    :data:`cluster.engine.async_engine.StepObserver`. Call from the event loop."""

    def __init__(self):
        self._gauges = {k: metrics.Gauge(f"magi_engine_{k}", description=d) for k, d in _GAUGES.items()}
        self._hists = {k: metrics.Histogram(f"magi_engine_{k}", description=d, boundaries=list(DEFAULT_BUCKETS_S))
                       for k, d in _HISTOGRAMS.items()}
        self._chunks = metrics.Counter("magi_engine_chunks_produced", description="clean latent chunks produced")

    def after_step(self, stats: EngineStats, step_s: float | None, events: list) -> None:
        """Export the engine's state after a step.

        Args:
            stats: ``Engine.stats()`` taken after the step.
            step_s: the step's wall time (seconds) if a forward ran, else None.
            events: the step's events; each ``LatentChunk`` counts one chunk and its
                ``timings["ttfc_s"]`` / ``timings["tpoc_s"]`` feed the histograms.
        """
        gauges = {
            "active_jobs": stats.active_jobs, "queued_jobs": stats.queued_jobs, "paused_jobs": stats.paused_jobs,
            "kv_pool_used_bytes": stats.kv_pool_used_bytes, "kv_pool_bytes": stats.kv_pool_bytes,
            "kv_pool_used_blocks": stats.kv_pool_blocks - stats.kv_pool_free_blocks,
        }
        for name, value in gauges.items():
            self._gauges[name].set(value)
        if step_s is not None:
            self._hists["step_seconds"].observe(step_s)
        for event in events:
            if isinstance(event, LatentChunk):
                self._chunks.inc()
                for key, name in (("ttfc_s", "ttfc_seconds"), ("tpoc_s", "tpoc_seconds")):
                    if key in event.timings:
                        self._hists[name].observe(event.timings[key])
