"""The fit planner's types: :class:`FitSettings` (what is planned) and :class:`FitPlan` (every
term of the result), and the plan's operator table (:func:`explain`). The arithmetic is in
:mod:`cluster.capacity.fit`, the does-not-fit advice in :mod:`cluster.capacity.report`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.capacity.gpus import GpuSpec
from cluster.capacity.kv import KVPlan
from cluster.capacity.working_set import StepShape
from cluster.units import format_bytes


class FitSettings(BaseModel):
    """How a replica is laid out and what the planner assumes (memory quantities in GiB).

    Attributes:
        cp_size: context-parallel ranks (Ulysses) per pipeline stage.
        pp_size: pipeline stages (consecutive layers) per replica; GPUs = cp_size * pp_size.
        height, width: video resolution in pixels; None = the model's default.
        kv_pool_fraction: share of the memory left after fixed terms given to the KV pool
            (and the jobs' latents).
        jobs_per_forward: jobs in one engine step (activations scale with them up to
            ``max_forward_tokens``); None = every admitted job in the step, as the engine runs
            them (solved, :mod:`cluster.capacity.fit`).
        max_active_jobs: cap on the jobs admitted (``engine.max_active_jobs``); None = no cap.
        prefix_chunks: whole V2V prefix chunks every job brings (all are forwarded in one
            prefix-extraction call; the KV region grows with them):
            ``max_prefix_frames // temporal_downsample_factor // chunk_width``; 0 = T2V/I2V jobs.
        prefix_forward_chunks: whole prefix chunks of the longest prefix-extraction forward
            (activations only; the engine admits a larger V2V region by its blocks); None =
            ``prefix_chunks``. The replica plans ``limits.max_prefix_frames``.
        max_forward_tokens: query tokens of one DiT forward at most (``engine.max_forward_tokens``,
            :class:`cluster.engine.runner.BatchRunner`; a window is never split); None = one
            forward per step (per branch kind without ``batch_cfg``).
        micro_batches: micro-batches per forward (``parallel.micro_batches``); None = the mesh
            default (``2 * pp_size`` with a pipeline, else 1); ignored on a single rank.
        batch_cfg: CFG branches of cfg_number 3 models share one DiT call (``engine.batch_cfg``,
            the engine's default); False = one call per branch kind.
        attention: ``flash`` (varlen kernel, no score matrix; the engine on CUDA) or ``sdpa``
            (one SDPA call per chunk, :class:`stages.dit.attention.SdpaRangeAttention`; the
            engine on CPU).
        cuda_context_gib: CUDA context, driver reservation, library workspaces per process
            (not counted on a CPU device).
        nccl_buffer_gib: buffers per process group a rank joins (cp group, pp group).
        fragmentation_fraction: share of device memory held back for allocator fragmentation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    cp_size: int = Field(1, ge=1)
    pp_size: int = Field(1, ge=1)
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    kv_pool_fraction: float = Field(0.9, gt=0, le=1)
    jobs_per_forward: int | None = Field(None, ge=1)
    max_active_jobs: int | None = Field(None, ge=1)
    prefix_chunks: int = Field(0, ge=0)
    prefix_forward_chunks: int | None = Field(None, ge=0)
    max_forward_tokens: int | None = Field(None, ge=1)
    micro_batches: int | None = Field(None, ge=1)
    batch_cfg: bool = True
    attention: Literal["flash", "sdpa"] = "flash"
    cuda_context_gib: float = Field(1.0, ge=0)
    nccl_buffer_gib: float = Field(0.25, ge=0)
    fragmentation_fraction: float = Field(0.05, ge=0, lt=1)


@dataclass(frozen=True)
class FitPlan:
    """Every term of one replica's memory plan, per GPU rank, in bytes (see module docstring).

    ``max_concurrent_jobs`` is what admission may hold at once (the engine's
    ``max_active_jobs``), ``kv_pool_blocks`` the pool the engine allocates for them;
    ``shortfall_bytes`` is how much more memory per GPU one job would need (0 when it fits).
    ``jobs_per_forward`` is the number of jobs in the step the activations were planned for
    (all in one forward unless ``settings.max_forward_tokens`` splits the step; ``shape`` is
    the largest forward).
    """

    model: str
    gpu: GpuSpec
    settings: FitSettings
    height: int
    width: int
    weight_format: str
    shape: StepShape
    kv: KVPlan
    jobs_per_forward: int
    pp_stage_weight_bytes: tuple[int, ...]
    activation_terms: tuple[tuple[str, int], ...]
    overhead_terms: tuple[tuple[str, int], ...]
    gpu_bytes_per_job: int
    kv_pool_budget_bytes: int
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
        return max(self.pp_stage_weight_bytes)

    @property
    def activation_bytes(self) -> int:
        return sum(v for _, v in self.activation_terms)

    @property
    def overhead_bytes(self) -> int:
        return sum(v for _, v in self.overhead_terms)

    @property
    def fixed_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.overhead_bytes

    @property
    def free_bytes(self) -> int:
        """Memory left for the KV pool (negative when the fixed terms alone do not fit)."""
        return self.memory_bytes - self.fixed_bytes

    @property
    def kv_bytes_per_job(self) -> int:
        """One job's KV-pool region on the rank (whole blocks)."""
        return self.kv.bytes_per_job

    @property
    def kv_pool_blocks(self) -> int:
        """Blocks of the pool the engine allocates: ``max_concurrent_jobs * blocks_per_job``."""
        return self.max_concurrent_jobs * self.kv.blocks_per_job

    @property
    def kv_pool_bytes(self) -> int:
        """Bytes of that pool on one rank (``KVPool.nbytes`` of the rank's shard)."""
        return self.kv.pool_bytes(self.kv_pool_blocks)

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
        return explain(self)


def gib(n: int, digits: int = 1) -> str:
    """``n`` bytes in GiB for the plan's prose (:func:`cluster.units.format_bytes`)."""
    return format_bytes(n, "GiB", digits)


def headline(plan: FitPlan) -> str:
    s = plan.settings
    return (f"{plan.model} on {plan.num_gpus} x {plan.gpu} with cp_size {s.cp_size} x pp_size {s.pp_size} "
            f"at {plan.height}x{plan.width} ({plan.weight_format} weights)")


def explain(plan: FitPlan) -> str:
    """Multi-line table of every term in GiB per GPU, the KV pool and the verdict."""
    sh, s, kv = plan.shape, plan.settings, plan.kv
    lines = [headline(plan), "per rank (host memory)" if plan.gpu.kind == "cpu" else "per GPU"]

    def row(label: str, n: int, indent: int = 2) -> None:
        lines.append(f"{' ' * indent}{label:<{70 - indent}}{format_bytes(n, 'GiB', 2, 8)}")

    row(f"weights (heaviest of {s.pp_size} pipeline stage(s), {sh.layers_per_pp_stage} layers)", plan.weights_bytes)
    row(f"activations (largest forward of a {plan.jobs_per_forward}-job step: {sh.chunks_per_forward} chunks,"
        f" {sh.tokens_per_rank} tokens/rank" + (f", {sh.micro_batches} micro-batches" if sh.micro_batches > 1 else "")
        + ")", plan.activation_bytes)
    for name, n in plan.activation_terms:
        row(name, n, 4)
    lines.append(f"    {forward_line(plan)}")
    for name, n in plan.overhead_terms:
        row(name, n)
    row("= fixed", plan.fixed_bytes)
    row(f"device memory ({plan.gpu.description})", plan.memory_bytes)
    row("free", plan.free_bytes)
    row(f"KV budget ({s.kv_pool_fraction:.0%} of free)", plan.kv_pool_budget_bytes)
    a = kv.areas
    parts = " + ".join(f"{n} {name}" for name, n in (("history", a.history), ("text", a.text), ("uncond", a.uncond),
                                                      ("self_only", a.self_only)) if n)
    row(f"KV per job ({a.total} chunks: {parts} -> {kv.blocks_per_job} blocks)", plan.kv_bytes_per_job)
    lines.append(f"    block = {kv.block_tokens} tokens x {kv.layers_per_rank} layers x {kv.groups_per_rank} KV groups"
                 f" x {kv.head_dim} x K,V = {format_bytes(kv.block_bytes, 'MiB')}")
    row("GPU bytes per job (KV region on GPU + latents)", plan.gpu_bytes_per_job)
    row(f"KV pool allocated ({plan.kv_pool_blocks} blocks)", plan.kv_pool_bytes)
    verdict = "FITS" if plan.fits else f"DOES NOT FIT (short by {gib(plan.shortfall_bytes, 2)} per GPU)"
    lines.append(f"max concurrent jobs: {plan.max_concurrent_jobs}  -> {verdict}")
    lines.extend(f"problem: {p}" for p in plan.problems)
    return "\n".join(lines)


def window_tokens(plan: FitPlan) -> int:
    """Query tokens of the largest window of a job's step at the planned resolution: the
    smallest ``max_forward_tokens`` that changes anything (a window is never split)."""
    return plan.shape.window_chunks * plan.shape.tokens_per_chunk


def forward_line(plan: FitPlan) -> str:
    """How the step's windows become forwards (``engine.batch_cfg``, ``engine.max_forward_tokens``)."""
    s, sh = plan.settings, plan.shape
    budget = "none (one forward per step)" if s.max_forward_tokens is None else s.max_forward_tokens
    prefix = f", V2V prefix window {sh.prefix_chunks} chunks" if sh.prefix_chunks > sh.window_chunks else ""
    return (f"forwards: batch_cfg {str(s.batch_cfg).lower()}, max_forward_tokens {budget}; a job's step"
            f" {sh.chunks_per_job} chunks of {sh.tokens_per_chunk} tokens in windows of <= {sh.window_chunks} chunks"
            f" ({window_tokens(plan)} tokens){prefix}")
