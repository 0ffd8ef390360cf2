"""``grpc.health.v1.Health/Check`` answers: can the application generate right now?

SERVING when Serve reports the application RUNNING and the DiTEngine deployment has
at least one RUNNING replica (``ray.serve.status()``, one controller call, cached for
``ttl_s``); NOT_SERVING otherwise, also when the status cannot be read. Serve notices a
dead replica at its next health check of it (``health_check_period_s``, 10 s by default),
so the answer may lag a replica's death by that long. ``Watch`` is not served
(UNIMPLEMENTED, :mod:`cluster.serve.servicers`).
"""

from __future__ import annotations

import asyncio
import time

from grpc_health.v1 import health_pb2
from ray import serve

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def can_generate(status, app_name: str, engine: str) -> bool:
    """From a ``serve.status()`` result: app ``app_name`` RUNNING with a RUNNING ``engine`` replica."""
    app = status.applications.get(app_name)
    if app is None or app.status != "RUNNING":
        return False
    deployment = app.deployments.get(engine)
    return deployment is not None and deployment.replica_states.get("RUNNING", 0) > 0


class ServingProbe:
    """Cached health of one application (never raises).

    Args:
        app_name: the Serve application; engine: its DiT engine deployment's name.
        ttl_s: seconds an answer is reused (keeps ``Check`` cheap under polling).
    """

    def __init__(self, app_name: str, engine: str, ttl_s: float = 1.0):
        self._app, self._engine, self._ttl_s = app_name, engine, ttl_s
        self._answer, self._at = NOT_SERVING, float("-inf")
        self._lock = asyncio.Lock()

    async def status(self) -> int:
        """``HealthCheckResponse.SERVING`` or ``NOT_SERVING``."""
        async with self._lock:
            if time.monotonic() - self._at >= self._ttl_s:
                self._answer = SERVING if await self._read() else NOT_SERVING
                self._at = time.monotonic()
            return self._answer

    async def _read(self) -> bool:
        try:
            return can_generate(await asyncio.to_thread(serve.status), self._app, self._engine)
        except Exception:  # noqa: BLE001 - an unreadable status is an unhealthy service
            return False
