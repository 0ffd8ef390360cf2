"""Fit planning: do the DiT weights, one step's activations and a KV pool fit on the GPUs of
one engine replica, and how many concurrent jobs does the pool admit?

Per GPU rank (all ranks of a replica are planned as the heaviest one)::

    fixed  = weights(stage) + activations(step) + companions (T5/VAE if co-located)
             + cuda_context + nccl_buffers + fragmentation_fraction * memory
    free   = memory - fixed
    pool   = kv_pool_fraction * free                       (KV pool of the replica, per rank)
    jobs   = floor(pool / per_job)      per_job = KV ring + window + latents of one job
    fits   = jobs >= 1 (and no other problem, e.g. fp8 weights on a GPU without fp8)

Weights: :mod:`stages.parallel.weights` (exact, checked against the reference manifests).
With context parallelism every rank holds the full weights of its pipeline stage; pipeline
parallelism gives each stage ``num_layers / pp_size`` layers plus the embedders and final
layer (the reference builds those on every stage). Activations and KV:
:mod:`stages.parallel.working_set` (formulas and assumptions there). With ``kv_offload``
(reference ``engine_config.kv_offload``) the KV pool lives in host memory
(``host_kv_gib`` per GPU) and the GPU keeps a staging copy of one layer's K/V per job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stages.config import ModelConfig
from stages.errors import InvalidInput
from stages.parallel import working_set as ws
from stages.parallel.companions import text_encoder_bytes, vae_bytes
from stages.parallel.gpus import GiB, GpuSpec, get_gpu
from stages.parallel.weights import dit_stage_counts, nbytes, stage_layers


class FitSettings(BaseModel):
    """How a replica is laid out and what the planner assumes (memory quantities in GiB).

    Attributes:
        cp_size: context-parallel ranks (Ulysses) per pipeline stage.
        pp_size: pipeline stages (consecutive layers) per replica; GPUs = cp_size * pp_size.
        height, width: video resolution in pixels; None = the model's default.
        kv_pool_fraction: share of the memory left after fixed terms given to the KV pool.
        jobs_per_forward: jobs packed into one DiT call (activations scale with it).
        prefix_chunks: whole V2V prefix chunks a job may bring (all are forwarded in one
            prefix-extraction call): ``max_prefix_frames // temporal_downsample_factor //
            chunk_width``; 0 when V2V is off or the prefix fits the window.
        batch_cfg: CFG branches of cfg_number 3 models share one DiT call.
        attention: ``flash`` (variable-length kernel, no score matrix) or ``dense`` (SDPA
            with a boolean mask, as on CPU).
        kv_layout: ``ring`` (:class:`stages.dit.kv_cache.ChunkKVCache`, the engine today:
            ring + 1 chunks per job, gathered per forward) or ``contiguous`` (one [ring |
            window] buffer per job read in place, the reference layout); see
            :mod:`stages.parallel.working_set`.
        kv_offload: KV pool in host memory (reference ``kv_offload``); needs ``host_kv_gib``.
        host_kv_gib: host memory for the KV of one GPU rank.
        colocate_text_encoder, colocate_vae: the T5 encoder / VAE run on the same GPU.
        cuda_context_gib: CUDA context, driver reservation, library workspaces per process.
        nccl_buffer_gib: buffers per process group a rank joins (cp group, pp group).
        fragmentation_fraction: share of device memory held back for allocator fragmentation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    cp_size: int = Field(1, ge=1)
    pp_size: int = Field(1, ge=1)
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    kv_pool_fraction: float = Field(0.9, gt=0, le=1)
    jobs_per_forward: int = Field(1, ge=1)
    prefix_chunks: int = Field(0, ge=0)
    batch_cfg: bool = False
    attention: Literal["flash", "dense"] = "flash"
    kv_layout: Literal["ring", "contiguous"] = "ring"
    kv_offload: bool = False
    host_kv_gib: float | None = Field(None, gt=0)
    colocate_text_encoder: bool = False
    colocate_vae: bool = False
    cuda_context_gib: float = Field(1.0, ge=0)
    nccl_buffer_gib: float = Field(0.25, ge=0)
    fragmentation_fraction: float = Field(0.05, ge=0, lt=1)


@dataclass(frozen=True)
class FitPlan:
    """Every term of one replica's memory plan, per GPU rank, in bytes (see module docstring).

    ``max_concurrent_jobs`` is what admission may hold at once; ``shortfall_bytes`` is how
    much more memory per GPU one job would need (0 when it fits).
    """

    model: str
    gpu: GpuSpec
    settings: FitSettings
    height: int
    width: int
    weight_format: str
    shape: ws.StepShape
    stage_weight_bytes: tuple[int, ...]
    activation_terms: tuple[tuple[str, int], ...]
    companion_terms: tuple[tuple[str, int], ...]
    overhead_terms: tuple[tuple[str, int], ...]
    kv_bytes_per_job: int
    gpu_bytes_per_job: int
    kv_pool_bytes: int
    max_concurrent_jobs: int
    problems: tuple[str, ...]

    @property
    def num_gpus(self) -> int:
        return self.settings.cp_size * self.settings.pp_size

    @property
    def memory_bytes(self) -> int:
        return self.gpu.memory_bytes

    @property
    def weights_bytes(self) -> int:
        """Weights on the heaviest rank (pipeline stages differ by the fp8 first/last layers)."""
        return max(self.stage_weight_bytes)

    @property
    def activation_bytes(self) -> int:
        return sum(v for _, v in self.activation_terms)

    @property
    def companion_bytes(self) -> int:
        return sum(v for _, v in self.companion_terms)

    @property
    def overhead_bytes(self) -> int:
        return sum(v for _, v in self.overhead_terms)

    @property
    def fixed_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.companion_bytes + self.overhead_bytes

    @property
    def free_bytes(self) -> int:
        """Memory left for the KV pool (negative when the fixed terms alone do not fit)."""
        return self.memory_bytes - self.fixed_bytes

    @property
    def fits(self) -> bool:
        return not self.problems and self.max_concurrent_jobs >= 1

    @property
    def shortfall_bytes(self) -> int:
        """Extra bytes per GPU needed to admit one job (0 if it fits)."""
        need = self.fixed_bytes + math.ceil(self.gpu_bytes_per_job / self.settings.kv_pool_fraction)
        return max(0, need - self.memory_bytes)

    def explain(self) -> str:
        """Operator-readable table of every term (GiB per GPU) and the verdict."""
        from stages.parallel.report import explain

        return explain(self)


def _resolution(model: ModelConfig, s: FitSettings) -> tuple[int, int]:
    h, w = s.height or model.height, s.width or model.width
    step = model.vae_spatial_factor * model.dit.patch_size
    for name, value in (("height", h), ("width", w)):
        if value % step:
            raise InvalidInput(name, f"{value} is not a multiple of {step} (VAE factor x patch size)")
    return h, w


def validate_layout(model: ModelConfig, s: FitSettings) -> None:
    """Check cp/pp against the model (Ulysses head split, reference layer split).

    Raises:
        InvalidInput: field ``cp_size`` or ``pp_size`` named.
    """
    dit = model.dit
    heads, groups = dit.num_attention_heads, dit.num_query_groups
    if heads % s.cp_size:
        raise InvalidInput("cp_size", f"{s.cp_size} does not divide the {heads} attention heads (Ulysses)")
    if groups % s.cp_size and s.cp_size % groups:
        raise InvalidInput("cp_size", f"{s.cp_size} neither divides nor is a multiple of the {groups} KV head groups")
    if dit.num_layers % s.pp_size:
        raise InvalidInput("pp_size", f"{s.pp_size} does not divide the {dit.num_layers} layers")
    if s.kv_offload and s.host_kv_gib is None:
        raise InvalidInput("host_kv_gib", "kv_offload needs the host memory for KV per GPU")


def weight_format(model: ModelConfig) -> str:
    """``fp8`` for quantized checkpoints, else the layers' params_dtype."""
    return "fp8" if model.dit.fp8_quant else model.dit.params_dtype


def _overheads(gpu: GpuSpec, s: FitSettings) -> dict[str, int]:
    groups = (s.cp_size > 1) + (s.pp_size > 1)  # process groups a rank joins
    return {"CUDA context": int(s.cuda_context_gib * GiB), "NCCL buffers": int(groups * s.nccl_buffer_gib * GiB),
            "fragmentation margin": int(s.fragmentation_fraction * gpu.memory_bytes)}


def _admission(free: int, kv: int, per_job: int, s: FitSettings) -> tuple[int, int]:
    """(KV pool bytes, jobs it admits); with kv_offload the pool is host memory and the GPU
    share only bounds the jobs' latents."""
    share = max(0, int(free * s.kv_pool_fraction))
    if not s.kv_offload:
        return share, share // per_job
    pool = int(s.host_kv_gib * GiB)
    return pool, min(share // per_job, pool // kv)


def _problems(model: ModelConfig, gpu: GpuSpec, s: FitSettings, kv: int) -> tuple[str, ...]:
    problems = []
    if model.dit.fp8_quant and not gpu.supports_fp8:
        major, minor = gpu.compute_capability
        problems.append(f"{gpu.description} has compute capability {major}.{minor};"
                        " fp8 weights need >= 8.9 (use a bf16 checkpoint)")
    if s.kv_offload and s.host_kv_gib * GiB < kv:
        problems.append(f"host_kv_gib {s.host_kv_gib} is less than one job's KV ({kv / GiB:.2f} GiB)")
    return tuple(problems)


def plan_fit(model: ModelConfig, gpu: GpuSpec | str, settings: FitSettings | None = None) -> FitPlan:
    """Plan one replica of ``model`` on ``cp_size * pp_size`` GPUs of type ``gpu``.

    Raises:
        InvalidInput: unknown GPU, bad cp/pp split, resolution not a multiple of 16 (field named).
    """
    s = settings or FitSettings()
    gpu = get_gpu(gpu)
    validate_layout(model, s)
    h, w = _resolution(model, s)
    shape = ws.step_shape(model, h, w, cp_size=s.cp_size, pp_size=s.pp_size,
                          jobs_per_forward=s.jobs_per_forward, batch_cfg=s.batch_cfg, kv_layout=s.kv_layout,
                          prefix_chunks=s.prefix_chunks)
    stages = tuple(nbytes(dit_stage_counts(model.dit, r)) for r in stage_layers(model.dit.num_layers, s.pp_size))
    acts = ws.activation_terms(model, shape, cp_size=s.cp_size, pp_size=s.pp_size, jobs_per_forward=s.jobs_per_forward,
                               attention=s.attention, kv_layout=s.kv_layout, kv_offload=s.kv_offload)
    companions = {**(text_encoder_bytes(model) if s.colocate_text_encoder else {}),
                  **(vae_bytes(model, h, w) if s.colocate_vae else {})}
    overheads = _overheads(gpu, s)
    kv = ws.kv_bytes_per_job(model, shape)
    per_job = ws.latent_bytes_per_job(model, h, w) + (0 if s.kv_offload else kv)
    fixed = max(stages) + sum(acts.values()) + sum(companions.values()) + sum(overheads.values())
    pool, jobs = _admission(gpu.memory_bytes - fixed, kv, per_job, s)
    return FitPlan(
        model=model.name, gpu=gpu, settings=s, height=h, width=w, weight_format=weight_format(model), shape=shape,
        stage_weight_bytes=stages, activation_terms=tuple(acts.items()), companion_terms=tuple(companions.items()),
        overhead_terms=tuple(overheads.items()), kv_bytes_per_job=kv, gpu_bytes_per_job=per_job,
        kv_pool_bytes=pool, max_concurrent_jobs=jobs, problems=_problems(model, gpu, s, kv),
    )


class DoesNotFit(RuntimeError):
    """A replica layout cannot hold the model and one job; the message says what to change.

    Attributes:
        plan: the failing :class:`FitPlan`.
        options: ``(change, plan)`` pairs that were tried (see :func:`stages.parallel.report.options`).
    """

    def __init__(self, message: str, plan: FitPlan, options: list[tuple[str, FitPlan]]):
        super().__init__(message)
        self.plan = plan
        self.options = options


def check_fits(model: ModelConfig, gpu: GpuSpec | str, settings: FitSettings | None = None) -> FitPlan:
    """:func:`plan_fit`, raising when the plan does not admit one job.

    Raises:
        DoesNotFit: the message names the GPU, the shortfall in GiB per GPU and the changes
            that were evaluated (more cp, more pp, fp8 weights, lower resolution, ...) with
            their outcome.
        InvalidInput: see :func:`plan_fit`.
    """
    from stages.parallel.report import does_not_fit_message, options

    plan = plan_fit(model, gpu, settings)
    if plan.fits:
        return plan
    tried = options(model, plan)
    raise DoesNotFit(does_not_fit_message(plan, tried), plan, tried)
