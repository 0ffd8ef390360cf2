"""Service configuration tree (pydantic): model preset, request limits, deployments, gRPC.

One validated tree, loaded from YAML. ``ray_serve.yaml`` carries it as the
``args`` of the application builder (:func:`cluster.serve.app.build_app`); a plain
YAML file holding only these keys works too. Unknown keys are rejected and every
error names the offending key path (e.g. ``limits.max_chunks``).

The model itself is not described here: ``model`` names a preset of
:mod:`stages.config` (the one model config tree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.units import MiB
from stages.config import ModelConfig, check_preset, load_preset


class ConfigError(ValueError):
    """A service configuration file or dict is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class RequestLimits(_Strict):
    """Bounds every request must respect (checked by :mod:`cluster.serve.validate`)."""

    max_chunks: int = Field(64, gt=0, description="chunks per job")
    max_height: int = Field(1280, gt=0, description="pixels")
    max_width: int = Field(1280, gt=0, description="pixels")
    max_steps: int = Field(64, gt=0, description="denoising steps per chunk")
    max_prompt_chars: int = Field(4096, gt=0, description="Unicode code points per prompt segment")
    max_prompt_segments: int = Field(64, gt=0, description="prompt segments per request")
    max_image_bytes: int = Field(20 * MiB, gt=0, description="encoded I2V image, bytes")
    max_video_bytes: int = Field(64 * MiB, gt=0, description="encoded V2V prefix video, bytes")
    max_prefix_frames: int = Field(192, gt=0, description="V2V prefix video frames kept (the last ones)")
    max_request_bytes: int | None = Field(
        None, gt=0, description="largest request message, bytes; None = the largest media field + 1 MiB. "
        "The gRPC proxy refuses a longer one from its length prefix (RESOURCE_EXHAUSTED), unbuffered")

    def request_cap(self) -> int:
        """``max_request_bytes``, or max(``max_image_bytes``, ``max_video_bytes``) + 1 MiB (bytes)."""
        return self.max_request_bytes or max(self.max_image_bytes, self.max_video_bytes) + MiB


class DeploymentSettings(_Strict):
    """Ray Serve settings of one deployment (``ray_actor_options.num_cpus`` etc.)."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica (fractional is fine)")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica (per rank with parallelism)")
    num_replicas: int = Field(1, gt=0)
    max_ongoing_requests: int = Field(16, gt=0, description="concurrent requests per replica")
    graceful_shutdown_timeout_s: float = Field(
        600.0, gt=0, description="seconds a replica being stopped waits for its streams"
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads per replica; None = Ray's OMP_NUM_THREADS "
        "(1 for a fractional num_cpus)"
    )


def _ingress() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.25, max_ongoing_requests=64)


def _text_encoder() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.25, max_ongoing_requests=16)


def _dit_engine() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.5, max_ongoing_requests=32, torch_threads=2)


def _vae_decoder() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.5, max_ongoing_requests=16, torch_threads=1)


class Deployments(_Strict):
    """Per-deployment settings; the defaults fit the whole app on 2 CPUs (1.5 reserved).

    Default torch threads (measured with bench/e2e.py on 2 cores): the DiT gets both
    cores (it runs alone until the first chunk), the VAE one, so that a decode
    overlapping a DiT step runs 3 threads on 2 cores; 2 + 2 threads oversubscribe
    and made chunk 0's decode about 2x slower.
    """

    ingress: DeploymentSettings = Field(default_factory=_ingress)
    text_encoder: DeploymentSettings = Field(default_factory=_text_encoder)
    dit_engine: DeploymentSettings = Field(default_factory=_dit_engine)
    vae_decoder: DeploymentSettings = Field(default_factory=_vae_decoder)


class EngineSettings(_Strict):
    """DiT engine admission and forwards (:class:`cluster.engine.Engine`): jobs batched per step,
    jobs waiting, how a step's windows are grouped into DiT forwards.

    A job beyond ``max_active_jobs + queue_limit`` is refused with RESOURCE_EXHAUSTED
    and a retry hint; keep ``deployments.dit_engine.max_ongoing_requests`` at least
    their sum so that requests wait in the engine's queue rather than in Serve's.

    ``batch_cfg`` and ``max_forward_tokens`` change the activation memory of a step, so the
    replica's capacity (:mod:`cluster.capacity.replica`) is planned with them and the engine is
    built with the same values. Outputs do not depend on either (same windows, bitwise on CPU
    float32; tests/model/test_engine_batching.py). Without a token budget a step is one forward
    over every active job, so activations grow with the jobs admitted; with one, they stop
    growing at the budget and the KV pool alone bounds the jobs. One window is ``W + 1`` chunks
    (``+ 1`` distilled) of ``tokens_per_chunk`` tokens: 5 x 21600 = 108000 tokens for MAGI-1
    at 720x1280, the smallest useful budget (``python -m cluster.capacity.profiles`` prints it).
    """

    max_active_jobs: int = Field(4, gt=0, description="jobs advanced by one engine step at most")
    queue_limit: int = Field(16, ge=0, description="jobs waiting for admission at most")
    attention: str = Field("auto", pattern="^(auto|sdpa|flash)$",
                           description="range-attention backend (stages.dit.flash_attention.make_attention): "
                           "auto = flash varlen on CUDA when a kernel is usable, else SDPA")
    batch_cfg: bool = Field(True, description="guidance branches (cond, text, uncond) of cfg_number 3 models in "
                            "one DiT forward; false = one forward per branch kind (smaller activations, "
                            "more forwards)")
    max_forward_tokens: int | None = Field(None, gt=0, description="query tokens of one DiT forward at most: a "
                                           "step's windows are split over several forwards (a window is never "
                                           "split); bounds activation memory however many jobs are active; "
                                           "None = one forward per step")
    max_buffered_chunks: int = Field(2, gt=0, description="clean chunks of a job produced but not yet taken by "
                                     "its stream's reader: at this many the job is paused (it keeps its KV region "
                                     "and admission slot, leaves the step's forward) until its reader takes one "
                                     "(backpressure from a client that reads slowly; README)")
    paused_timeout_s: float = Field(600.0, gt=0, description="seconds a job may stay paused (its reader takes "
                                    "nothing) before the engine cancels it and frees its KV region")


class ParallelSettings(_Strict):
    """How one DiTEngine replica spreads the DiT over devices (DESIGN.md section 2).

    ``cp_size * pp_size`` ranks per replica: ``pp_size`` stages of consecutive layers, each
    split over ``cp_size`` ranks by tokens (Ulysses context parallelism, K/V sharded by KV
    head group). The replica is rank 0; the other ranks are Ray actors in the replica's
    placement group (one bundle per rank, STRICT_PACK).
    """

    cp_size: int = Field(1, gt=0, description="context-parallel ranks per pipeline stage")
    pp_size: int = Field(1, gt=0, description="pipeline stages of consecutive DiT layers")
    backend: str = Field("auto", pattern="^(auto|gloo|nccl)$",
                         description="torch.distributed backend; auto = nccl with CUDA, else gloo")
    micro_batches: int | None = Field(None, gt=0, description="pipeline micro-batches per forward; "
                                      "None = 2 * pp_size (chunk-aligned)")
    init_timeout_s: float = Field(120.0, gt=0, description="seconds the ranks wait for each other at start-up")
    gpu: str = Field("auto", description="device the replica is planned for (cluster.capacity.replica): auto = "
                     "the CUDA device torch reports (known board by name, else its total memory) or, without "
                     "CUDA, host memory; cpu = host memory; or a GPU type key of cluster.capacity.gpus.GPUS")
    kv_pool_fraction: float = Field(0.9, gt=0, le=1, description="share of the memory left after weights, "
                                    "activations and overheads given to the engine's KV pool")
    plan_height: int | None = Field(None, gt=0, description="video height (pixels) the KV pool and activations "
                                    "are planned for; None = the model's default")
    plan_width: int | None = Field(None, gt=0, description="video width (pixels) planned for; None = the model's default")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        from cluster.capacity.gpus import GPUS  # noqa: PLC0415 (cluster.capacity imports this module)

        value = value.lower()
        if value not in ("auto", "cpu", *GPUS):
            raise ValueError(f"unknown device {value!r}; known: auto, cpu, {', '.join(sorted(GPUS))}")
        return value

    @property
    def world_size(self) -> int:
        return self.cp_size * self.pp_size


class ServiceConfig(_Strict):
    """Everything the service needs besides the model weights.

    Attributes:
        model: preset name in :data:`stages.config.PRESETS` (e.g. ``"magi-tiny"``).
        checkpoint_root: folder holding ``models/<name>`` checkpoints; None = the
            model store's default (``$MAGI_HOME`` or ``~/.cache/magi-serve``).
        limits: request bounds.
        deployments: Ray Serve settings per deployment.
        engine: DiT engine admission limits.
        parallel: context / pipeline parallelism of each DiTEngine replica.
        grpc_port: port of Serve's gRPC proxy (``grpc_options.port`` in ray_serve.yaml).
        max_message_bytes: largest ``Chunk.data`` per response message; bigger
            payloads are split into parts (keeps messages under gRPC's 4 MB default).
        max_pending_decodes: latent chunks the ingress may have in VAE decode at once
            per job (bounds ingress memory when the VAE is slower than the DiT).
    """

    model: str = "magi-tiny"
    checkpoint_root: Path | None = None
    limits: RequestLimits = Field(default_factory=RequestLimits)
    deployments: Deployments = Field(default_factory=Deployments)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)
    grpc_port: int = Field(9000, gt=0, lt=65536)
    max_message_bytes: int = Field(3 * MiB, ge=64 * 1024, le=4 * MiB - 64 * 1024)
    max_pending_decodes: int = Field(4, gt=0)

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return check_preset(name)

    def load_model(self) -> ModelConfig:
        """The :class:`stages.config.ModelConfig` of the ``model`` preset."""
        return load_preset(self.model)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> "ServiceConfig":
        """Validate a plain dict (e.g. the builder's ``args``).

        Raises:
            ConfigError: the message lists each bad key path and why, prefixed by ``source``.
        """
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(f"{source}: {format_errors(exc)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServiceConfig":
        """Load from a YAML file: either a Serve config (``applications[0].args``) or the bare tree.

        Raises:
            ConfigError: unreadable YAML, or a bad key (named in the message).
        """
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read YAML: {exc}") from None
        if isinstance(data, dict) and "applications" in data:
            data = app_args(data, str(path))
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data, str(path))


def app_args(serve_config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """The builder ``args`` of the single application of a Serve config dict.

    Raises:
        ConfigError: ``applications`` is not a one-element list of mappings.
    """
    apps = serve_config.get("applications")
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"{source}: applications: expected exactly one application")
    args = apps[0].get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: applications[0].args: expected a mapping")
    return args


def format_errors(exc: ValidationError) -> str:
    """``"limits.max_chunks: Input should be greater than 0; foo: Extra inputs ..."``."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{key}: {err['msg']}")
    return "; ".join(parts)
