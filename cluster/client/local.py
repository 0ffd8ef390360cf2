"""Run the service on this machine: an embedded Ray + Serve with the gRPC proxy.

Used by ``magi generate`` without ``--address``, ``magi serve``, the serve tests
and the end-to-end benchmark. A local Ray instance listens on loopback only
(``_node_ip_address=127.0.0.1``, random free ports, no dashboard, token auth
off); with ``ray_address`` (or ``RAY_ADDRESS``) Serve is started on an existing
cluster instead. Serve's gRPC proxy itself binds ``[::]:port`` (not configurable
in Ray 2.60); clients use ``127.0.0.1:port``.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from cluster.config import ServiceConfig

_ROOT = Path(__file__).resolve().parents[2]  # repository root (holds cluster/, stages/, proto/)
_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",  # Ray 2.60 turns token auth on by default
    "RAY_USAGE_STATS_ENABLED": "0",  # no network at run time
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment() -> None:
    """Env for Ray workers: offline flags, auth off, and ``PYTHONPATH`` with the repo and proto/.

    The gRPC proxy imports ``magi.v1.*_pb2_grpc`` and replicas import ``cluster`` /
    ``stages``: workers inherit this process's environment, so it is set before ray.init.
    """
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    paths = [str(_ROOT), str(_ROOT / "proto")]
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in current if p not in paths])


class LocalService:
    """Context manager: start Ray (if needed) + Serve + the magi app; stop them on exit.

    Args:
        cfg: service configuration (default: all defaults, model magi-tiny).
        grpc_port: gRPC proxy port; None = ``cfg.grpc_port`` if ``ray_address`` is
            given, else a free loopback port.
        ray_address: existing cluster to use ("auto", "ray://...", or from
            ``RAY_ADDRESS``); None = start a local instance with ``num_cpus`` CPUs.
        num_cpus: CPUs of the local Ray instance.
        quiet: keep Ray's and Serve's INFO logs off the console (the CLI's choice).
    """

    def __init__(self, cfg: ServiceConfig | None = None, *, grpc_port: int | None = None,
                 ray_address: str | None = None, num_cpus: int = 2,
                 object_store_bytes: int = 512 * 1024 * 1024, quiet: bool = False):
        self.cfg = cfg or ServiceConfig()
        self.ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
        self.grpc_port = grpc_port or (self.cfg.grpc_port if self.ray_address else free_port())
        self.num_cpus = num_cpus
        self.object_store_bytes = object_store_bytes
        self.quiet = quiet
        self._started_ray = False

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> str:
        """Start everything; returns :attr:`address` once health reports SERVING."""
        import ray  # noqa: PLC0415
        from ray import serve  # noqa: PLC0415

        from cluster.client.sdk import MagiClient  # noqa: PLC0415
        from cluster.serve.app import APP_NAME, ROUTE_PREFIX, build_app, grpc_options  # noqa: PLC0415

        prepare_environment()
        if self.quiet:
            logging.getLogger("ray").setLevel(logging.WARNING)
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
        if not ray.is_initialized():
            if self.ray_address:
                ray.init(address=self.ray_address)
            else:
                ray.init(
                    num_cpus=self.num_cpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    object_store_memory=self.object_store_bytes,
                    log_to_driver=False,
                    logging_level=logging.WARNING if self.quiet else logging.INFO,
                )
                self._started_ray = True
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=grpc_options(self.grpc_port),
        )
        serve.run(build_app(self.cfg), name=APP_NAME, route_prefix=ROUTE_PREFIX)
        with MagiClient(self.address) as client:
            client.wait_ready()
        return self.address

    def stop(self) -> None:
        """Shut Serve down, and Ray too if this object started it."""
        import ray  # noqa: PLC0415
        from ray import serve  # noqa: PLC0415

        if ray.is_initialized():
            serve.shutdown()
            if self._started_ray:
                ray.shutdown()

    def __enter__(self) -> "LocalService":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
