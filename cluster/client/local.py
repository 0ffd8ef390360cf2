"""Run the service on this machine: an embedded Ray + Serve with the gRPC proxy.

Used by ``magi generate`` without ``--address``, ``magi serve``, the serve tests
and the end-to-end benchmark. A local Ray instance started here listens on
``host`` only (default 127.0.0.1; no dashboard, token auth off): GCS, raylet,
object manager, agents, metrics, every worker's gRPC server, Serve's HTTP and gRPC
proxies and its replicas' inter-deployment servers (checked by
tests/serve/test_local_sockets.py). Ray 2.60 needs three settings for that:

* ``_node_ip_address``: the GCS, raylet and workers bind to the node address.
  ``ray.init`` turns 127.0.0.1 into the machine's external address unless
  multi-node mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), which is read
  once when ``ray`` is imported (``ray._private.services.get_node_ip_address``).
* ``http_options.host`` for Serve's HTTP proxy.
* Serve's gRPC proxy (``ray/serve/_private/grpc_util.py`` ``start_grpc_server``) and
  each replica's inter-deployment gRPC server (``ray/serve/_private/replica.py``
  ``_on_initialized``) bind ``[::]`` with no setting: the ``worker_process_setup_hook``
  run in every worker (:func:`cluster.serve.ray_patches.setup_worker`) rebinds them to
  ``host``; the same hook bounds Serve's streams (backpressure, README).

With ``ray_address`` (or ``RAY_ADDRESS``) Serve is started on an existing cluster,
whose addresses are its own business.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from cluster.config import ServiceConfig
from cluster.serve.ray_patches import BIND_HOST_ENV as _BIND_HOST_ENV

_ROOT = Path(__file__).resolve().parents[2]  # repository root (holds cluster/, stages/, proto/)
_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",  # Ray 2.60 turns token auth on by default
    "RAY_USAGE_STATS_ENABLED": "0",  # no network at run time
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
LOOPBACK = "127.0.0.1"
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": node address 127.0.0.1 stays loopback
_WILDCARDS = ("0.0.0.0", "::", "")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``); "localhost" too."""
    if host == "localhost":
        return True
    addr = ipaddress.ip_address(host)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


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


def _single_node() -> None:
    """Keep a 127.0.0.1 node address (Ray reads the switch at import; set it in both places)."""
    os.environ[_SINGLE_NODE_ENV] = "0"
    if "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


class LocalService:
    """Context manager: start Ray (if needed) + Serve + the magi app; stop them on exit.

    Args:
        cfg: service configuration (default: all defaults, model magi-tiny).
        grpc_port: gRPC proxy port; None = ``cfg.grpc_port`` if ``ray_address`` is
            given, else a free port.
        ray_address: existing cluster to use ("auto", "ray://...", or from
            ``RAY_ADDRESS``); None = start a local instance with ``num_cpus`` CPUs.
        num_cpus: CPUs of the local Ray instance.
        host: address every listener of a local instance binds (an IP address; default
            loopback; "0.0.0.0" = Ray's and Serve's defaults: all interfaces).
        quiet: keep Ray's and Serve's INFO logs off the console (the CLI's choice).
    """

    def __init__(self, cfg: ServiceConfig | None = None, *, grpc_port: int | None = None,
                 ray_address: str | None = None, num_cpus: int = 2,
                 object_store_bytes: int = 512 * 1024 * 1024, host: str = LOOPBACK, quiet: bool = False):
        self.cfg = cfg or ServiceConfig()
        self.ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
        self.host = host
        self.grpc_port = grpc_port or (self.cfg.grpc_port if self.ray_address else free_port())
        self.num_cpus = num_cpus
        self.object_store_bytes = object_store_bytes
        self.quiet = quiet
        self._started_ray = False

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC endpoint (loopback when bound to all interfaces)."""
        host = LOOPBACK if self.host in _WILDCARDS or self.ray_address else self.host
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"

    def start(self) -> str:
        """Start everything; returns :attr:`address` once health reports SERVING."""
        prepare_environment()
        # Request size cap of Serve's gRPC proxy, read when Ray starts it (cluster.serve.servicers).
        os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(self.cfg.limits.request_cap())
        if not self.ray_address:
            self._bind_settings()
        import ray  # noqa: PLC0415
        from ray import serve  # noqa: PLC0415

        from cluster.client.sdk import MagiClient  # noqa: PLC0415
        from cluster.serve.app import APP_NAME, ROUTE_PREFIX, build_app, grpc_options  # noqa: PLC0415

        if self.quiet:
            logging.getLogger("ray").setLevel(logging.WARNING)
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
        if not ray.is_initialized():
            self._init_ray(ray)
        http_host = LOOPBACK if self.ray_address else self.host
        serve.start(http_options={"host": http_host, "port": free_port(LOOPBACK)},
                    grpc_options=grpc_options(self.grpc_port))
        serve.run(build_app(self.cfg), name=APP_NAME, route_prefix=ROUTE_PREFIX)
        with MagiClient(self.address) as client:
            client.wait_ready()
        return self.address

    def _bind_settings(self) -> None:
        """Env for a local instance bound to ``host`` (before ray is imported, if it is not yet)."""
        if self.host in _WILDCARDS:
            os.environ.pop(_BIND_HOST_ENV, None)
            return
        os.environ[_BIND_HOST_ENV] = self.host
        if is_loopback(self.host):
            _single_node()

    def _init_ray(self, ray) -> None:
        if self.ray_address:
            ray.init(address=self.ray_address)
            return
        bound = self.host not in _WILDCARDS
        ray.init(
            num_cpus=self.num_cpus,
            include_dashboard=False,
            _node_ip_address=self.host if bound else None,
            object_store_memory=self.object_store_bytes,
            log_to_driver=False,
            logging_level=logging.WARNING if self.quiet else logging.INFO,
            runtime_env={"worker_process_setup_hook": "cluster.serve.ray_patches.setup_worker"},
        )
        self._started_ray = True

    def drain(self, timeout_s: float, say: Callable[[str], None] = print,
              give_up: Callable[[], bool] = lambda: False) -> int:
        """Graceful stop, first half: the ingress refuses new jobs (UNAVAILABLE "service is
        shutting down"); wait up to ``timeout_s`` seconds (or until ``give_up()``) for its
        running streams to end. Tell the user what happens through ``say``. Reaches one
        GrpcIngress replica (a handle call goes to one): with ``deployments.ingress.num_replicas``
        > 1 the others keep admitting until Serve stops them.

        Returns:
            Streams still running when the wait ended (0: all finished).
        """
        from ray import serve  # noqa: PLC0415

        from cluster.serve.app import APP_NAME  # noqa: PLC0415

        ingress = serve.get_deployment_handle("GrpcIngress", app_name=APP_NAME)
        running = ingress.drain.remote().result()
        say(f"draining: new jobs are refused; waiting up to {timeout_s:.0f} s for {running} running stream(s)")
        deadline = time.monotonic() + timeout_s
        while running and time.monotonic() < deadline and not give_up():
            time.sleep(0.5)
            running = ingress.drain.remote().result()
        say("all streams finished" if not running else f"graceful timeout: {running} stream(s) will be cut")
        return running

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
