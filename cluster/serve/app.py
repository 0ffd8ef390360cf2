"""The Serve application builder (``import_path: cluster.serve.app:build_app`` in ray_serve.yaml).

Composes the four deployments, each configured from :class:`cluster.config.ServiceConfig`::

    GrpcIngress --> TextEncoder
                --> DiTEngine   (stream)
                --> VaeDecoder
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import gRPCOptions

from cluster.config import DeploymentSettings, ServiceConfig
from cluster.serve.dit_engine import DiTEngineDeployment
from cluster.serve.ingress import GrpcIngress
from cluster.serve.ranks import rank_bundles
from cluster.serve.text_encoder import TextEncoderDeployment
from cluster.serve.vae_decoder import VaeDecoderDeployment

APP_NAME = "magi"
ROUTE_PREFIX = "/magi"  # Serve routes gRPC calls only to applications with a route prefix

#: What Serve's gRPC proxy serves (besides reflection, on by default in Ray 2.60): our own
#: registrations, which pass raw request bytes to the ingress, serve Health/Check only and
#: keep Serve's own errors from the client (:mod:`cluster.serve.servicers`).
GRPC_SERVICER_FUNCTIONS = (
    "cluster.serve.servicers.add_video_generation_to_server",
    "cluster.serve.servicers.add_health_to_server",
)

#: Deployments that stream a job (DiTEngine -> GrpcIngress -> proxy) run their user code on the
#: replica's own event loop: Ray Serve 2.60 otherwise copies every yielded item into an
#: unbounded queue, ahead of the reader (backpressure: :mod:`cluster.serve.ray_patches`).
#: Their compute runs in threads (ComputeThread, asyncio.to_thread), not on that loop.
OWN_LOOP = {"runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder: ``args`` is a :class:`ServiceConfig` as a dict.

    Raises:
        cluster.config.ConfigError: a bad key in ``args`` (named in the message).
    """
    cfg = args if isinstance(args, ServiceConfig) else ServiceConfig.from_dict(args, "args")
    d = cfg.deployments
    text = _configure(TextEncoderDeployment, d.text_encoder).bind(cfg)
    bundles = rank_bundles(cfg.parallel, d.dit_engine)
    dit = _configure(DiTEngineDeployment, d.dit_engine, bundles, streams=True).bind(cfg)
    vae = _configure(VaeDecoderDeployment, d.vae_decoder).bind(cfg)
    return _configure(GrpcIngress, d.ingress, streams=True).bind(cfg, text, dit, vae)


def grpc_options(port: int) -> gRPCOptions:
    """gRPC proxy options: our servicers + health + reflection, no end-to-end request timeout."""
    return gRPCOptions(
        port=port,
        grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS),
        enable_reflection=True,
        request_timeout_s=None,
    )


def _configure(deployment, s: DeploymentSettings, bundles: list[dict[str, float]] | None = None,
               streams: bool = False):
    """Serve options of one deployment; ``bundles``: one placement-group bundle per rank of a
    parallel DiTEngine replica (STRICT_PACK: all ranks on one node; the replica is in bundle 0);
    ``streams``: it streams jobs (user code on the replica's loop, :data:`OWN_LOOP`)."""
    extra = {} if bundles is None else {"placement_group_bundles": bundles, "placement_group_strategy": "STRICT_PACK"}
    return deployment.options(
        num_replicas=s.num_replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        graceful_shutdown_timeout_s=s.graceful_shutdown_timeout_s,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, **(OWN_LOOP if streams else {})},
        **extra,
    )
