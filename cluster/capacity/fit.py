"""Fit planning: do the DiT weights, one step's activations and the engine's KV pool fit on
the GPUs of one engine replica, and how many concurrent jobs does the pool admit?

Per GPU rank (all ranks of a replica are planned as the heaviest one)::

    fixed  = weights(pp_stage) + activations(step of j jobs) + cuda_context + nccl_buffers
             + fragmentation_fraction * memory
    free   = memory - fixed
    budget = kv_pool_fraction * free                       (KV pool + job latents, per rank)
    jobs   = floor(budget / per_job)   per_job = the job's KV-pool region + its latents
    fits   = jobs >= 1 (and no other problem, e.g. fp8 weights on a GPU without fp8)

The engine packs every active job into one forward (continuous batching), so activations grow
with the jobs admitted: with ``jobs_per_forward`` None (the engine) the plan is solved for the
largest j (at most ``max_active_jobs``) whose plan with j jobs per step still admits j.
``max_forward_tokens`` (``engine.max_forward_tokens``) splits a step into forwards of at most
that many query tokens: activations are those of the largest such forward
(:func:`cluster.capacity.working_set.forward_chunks`), so past the budget they no longer grow
with j and the KV pool alone bounds the jobs. ``batch_cfg`` False (``engine.batch_cfg``) plans
one forward per guidance branch kind.
The engine then allocates ``kv_pool_blocks = jobs * blocks_per_job`` (``Engine(kv_pool_blocks=...)``).

Weights: :mod:`stages.parallel.weights` (exact, checked against the reference manifests).
With context parallelism every rank holds the full weights of its pipeline stage; pipeline
parallelism gives each pipeline stage ``num_layers / pp_size`` layers plus the embedders and
final layer (the reference builds those on every pipeline stage). KV: :mod:`cluster.capacity.kv` (the
engine's pool arithmetic). Activations: :mod:`cluster.capacity.working_set`.
The T5 encoder and the VAE run on their own deployments' devices (not planned here).
:func:`cluster.capacity.report.check_fits` raises with advice when the plan admits no job.
"""

from __future__ import annotations

import dataclasses

from cluster.capacity import working_set as ws
from cluster.capacity.gpus import GpuSpec, get_gpu
from cluster.capacity.kv import kv_plan
from cluster.capacity.plan import FitPlan, FitSettings
from cluster.units import GiB
from stages.config import ModelConfig
from stages.errors import InvalidInput
from stages.parallel.weights import dit_pp_stage_counts, nbytes, pp_stage_layers


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


def weight_format(model: ModelConfig) -> str:
    """``fp8`` for quantized checkpoints, else the layers' params_dtype."""
    return "fp8" if model.dit.fp8_quant else model.dit.params_dtype


def _overheads(gpu: GpuSpec, s: FitSettings) -> dict[str, int]:
    groups = (s.cp_size > 1) + (s.pp_size > 1)  # process groups a rank joins
    out = {} if gpu.kind == "cpu" else {"CUDA context": int(s.cuda_context_gib * GiB)}
    out["gloo buffers" if gpu.kind == "cpu" else "NCCL buffers"] = int(groups * s.nccl_buffer_gib * GiB)
    out["fragmentation margin"] = int(s.fragmentation_fraction * gpu.memory_bytes)
    return out


def _admission(free: int, per_job: int, s: FitSettings) -> tuple[int, int]:
    """(KV budget bytes, jobs it admits)."""
    share = max(0, int(free * s.kv_pool_fraction))
    return share, share // per_job


def _problems(model: ModelConfig, gpu: GpuSpec) -> tuple[str, ...]:
    problems = []
    if model.dit.fp8_quant and not gpu.supports_fp8:
        major, minor = gpu.compute_capability
        problems.append(f"{gpu.description} has compute capability {major}.{minor};"
                        " fp8 weights need >= 8.9 (use a bf16 checkpoint)")
    return tuple(problems)


def _plan(model: ModelConfig, gpu: GpuSpec, s: FitSettings, h: int, w: int, jobs: int) -> FitPlan:
    """The plan with activations for a step of ``jobs`` jobs (its largest forward)."""
    prefix = s.prefix_chunks if s.prefix_forward_chunks is None else s.prefix_forward_chunks
    shape = ws.step_shape(model, h, w, cp_size=s.cp_size, pp_size=s.pp_size, jobs_per_forward=jobs,
                          batch_cfg=s.batch_cfg, prefix_chunks=prefix, micro_batches=s.micro_batches,
                          max_forward_tokens=s.max_forward_tokens)
    kv = kv_plan(model, h, w, cp_size=s.cp_size, pp_size=s.pp_size, prefix_chunks=s.prefix_chunks)
    pp_stages = tuple(nbytes(dit_pp_stage_counts(model.dit, r))
                      for r in pp_stage_layers(model.dit.num_layers, s.pp_size))
    acts = ws.activation_terms(model, shape, cp_size=s.cp_size, pp_size=s.pp_size, attention=s.attention)
    overheads = _overheads(gpu, s)
    per_job = ws.latent_bytes_per_job(model, h, w) + kv.bytes_per_job
    fixed = max(pp_stages) + sum(acts.values()) + sum(overheads.values())
    budget, admitted = _admission(gpu.memory_bytes - fixed, per_job, s)
    if s.max_active_jobs is not None:
        admitted = min(admitted, s.max_active_jobs)
    return FitPlan(
        model=model.name, gpu=gpu, settings=s, height=h, width=w, weight_format=weight_format(model), shape=shape,
        kv=kv, jobs_per_forward=jobs, pp_stage_weight_bytes=pp_stages, activation_terms=tuple(acts.items()),
        overhead_terms=tuple(overheads.items()), gpu_bytes_per_job=per_job,
        kv_pool_budget_bytes=budget, max_concurrent_jobs=admitted, problems=_problems(model, gpu),
    )


def _solve_batched(model: ModelConfig, gpu: GpuSpec, s: FitSettings, h: int, w: int) -> FitPlan:
    """Largest j whose plan with j jobs per step admits j (admission is non-increasing in j:
    activations never shrink as j grows, so a binary search over [1, jobs admitted at j = 1]
    finds it); the plan of j, admitting j."""
    best = _plan(model, gpu, s, h, w, 1)
    lo, hi = 1, best.max_concurrent_jobs
    if hi < 1:
        return best
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _plan(model, gpu, s, h, w, mid).max_concurrent_jobs >= mid:
            lo = mid
        else:
            hi = mid - 1
    return dataclasses.replace(_plan(model, gpu, s, h, w, lo), max_concurrent_jobs=lo)


def plan_fit(model: ModelConfig, gpu: GpuSpec | str, settings: FitSettings | None = None) -> FitPlan:
    """Plan one replica of ``model`` on ``cp_size * pp_size`` GPUs of type ``gpu``.

    Raises:
        InvalidInput: unknown GPU, bad cp/pp split, resolution not a multiple of 16 (field named).
    """
    s = settings or FitSettings()
    gpu = get_gpu(gpu)
    validate_layout(model, s)
    h, w = _resolution(model, s)
    if s.jobs_per_forward is None:
        return _solve_batched(model, gpu, s, h, w)
    return _plan(model, gpu, s, h, w, s.jobs_per_forward)


__all__ = ["FitPlan", "FitSettings", "plan_fit", "validate_layout", "weight_format"]
