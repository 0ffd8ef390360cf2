"""Operator-facing text for fit plans: the term table and the does-not-fit advice."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.units import format_bytes
from stages.config import ModelConfig
from stages.errors import InvalidInput

if TYPE_CHECKING:
    from cluster.capacity.fit import FitPlan

MAX_GPUS_SEARCHED = 16
RESOLUTION_SCALES = (0.75, 2 / 3, 0.5)


def _gib(n: int, digits: int = 1) -> str:
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

    row(f"weights (heaviest of {s.pp_size} stage(s), {sh.layers_per_stage} layers)", plan.weights_bytes)
    row(f"activations (largest forward of a {plan.jobs_per_forward}-job step: {sh.chunks_per_forward} chunks,"
        f" {sh.tokens_per_rank} tokens/rank" + (f", {sh.micro_batches} micro-batches" if sh.micro_batches > 1 else "")
        + ")", plan.activation_bytes)
    for name, n in plan.activation_terms:
        row(name, n, 4)
    lines.append(f"    {forward_line(plan)}")
    for name, n in plan.companion_terms + plan.overhead_terms:
        row(name, n)
    row("= fixed", plan.fixed_bytes)
    row(f"device memory ({plan.gpu.description})", plan.memory_bytes)
    row("free", plan.free_bytes)
    row("KV budget (host memory, kv_offload)" if s.kv_offload else f"KV budget ({s.kv_pool_fraction:.0%} of free)",
        plan.kv_pool_budget_bytes)
    a = kv.areas
    parts = " + ".join(f"{n} {name}" for name, n in (("main", a.main), ("text", a.text), ("uncond", a.uncond),
                                                      ("extra", a.extra)) if n)
    row(f"KV per job ({a.total} chunks: {parts} -> {kv.blocks_per_job} blocks)", plan.kv_bytes_per_job)
    lines.append(f"    block = {kv.block_tokens} tokens x {kv.layers_per_rank} layers x {kv.groups_per_rank} KV groups"
                 f" x {kv.head_dim} x K,V = {format_bytes(kv.block_bytes, 'MiB')}")
    row("GPU bytes per job (KV region on GPU + latents)", plan.gpu_bytes_per_job)
    row(f"KV pool allocated ({plan.kv_pool_blocks} blocks)", plan.kv_pool_bytes)
    verdict = "FITS" if plan.fits else f"DOES NOT FIT (short by {_gib(plan.shortfall_bytes, 2)} per GPU)"
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


def _outcome(plan: FitPlan) -> str:
    if plan.fits:
        return f"fits, {plan.max_concurrent_jobs} job(s)"
    if plan.problems:
        return "; ".join(plan.problems)
    return f"short by {_gib(plan.shortfall_bytes)}"


def _try(model: ModelConfig, plan: FitPlan, **changes) -> FitPlan | None:
    from cluster.capacity.fit import plan_fit  # noqa: PLC0415

    try:
        return plan_fit(model, plan.gpu, plan.settings.model_copy(update=changes))
    except InvalidInput:
        return None


def _with_fp8(model: ModelConfig, fp8: bool) -> ModelConfig:
    return model.model_copy(update={"dit": model.dit.model_copy(update={"fp8_quant": fp8})})


def _smaller(value: int, scale: float, step: int) -> int:
    return max(step, int(value * scale) // step * step)


def smallest_layout(model: ModelConfig, plan: FitPlan) -> FitPlan | None:
    """The fitting cp x pp layout with the fewest GPUs (ties: larger cp), up to 16 GPUs."""
    layouts = sorted(((cp, pp) for cp in range(1, MAX_GPUS_SEARCHED + 1) for pp in range(1, MAX_GPUS_SEARCHED + 1)
                      if cp * pp <= MAX_GPUS_SEARCHED), key=lambda l: (l[0] * l[1], l[1]))
    for cp, pp in layouts:
        found = _try(model, plan, cp_size=cp, pp_size=pp)
        if found is not None and found.fits:
            return found
    return None


def _candidates(model: ModelConfig, plan: FitPlan) -> list[tuple[str, ModelConfig, dict]]:
    s = plan.settings
    if model.dit.fp8_quant and not plan.gpu.supports_fp8:  # nothing else helps until this is fixed
        return [("bf16 weights (a non-quantized checkpoint)", _with_fp8(model, False), {})]
    step = model.vae_spatial_factor * model.dit.patch_size
    out: list[tuple[str, ModelConfig, dict]] = [
        (f"cp_size {2 * s.cp_size} ({2 * plan.num_gpus} GPUs)", model, {"cp_size": 2 * s.cp_size}),
        (f"pp_size {2 * s.pp_size} ({2 * plan.num_gpus} GPUs)", model, {"pp_size": 2 * s.pp_size}),
    ]
    if not model.dit.fp8_quant and plan.gpu.supports_fp8:
        out.append(("fp8 weights (the distill-fp8 checkpoint)", _with_fp8(model, True), {}))
    for scale in RESOLUTION_SCALES:
        h, w = _smaller(plan.height, scale, step), _smaller(plan.width, scale, step)
        out.append((f"resolution {h}x{w}", model, {"height": h, "width": w}))
    out.extend(_forward_candidates(model, plan))
    if s.jobs_per_forward is not None and s.jobs_per_forward > 1:
        out.append(("jobs_per_forward 1", model, {"jobs_per_forward": 1}))
    if s.colocate_text_encoder or s.colocate_vae:
        out.append(("T5 and VAE on their own GPUs", model, {"colocate_text_encoder": False, "colocate_vae": False}))
    return out


def _forward_candidates(model: ModelConfig, plan: FitPlan) -> list[tuple[str, ModelConfig, dict]]:
    """The engine's forward settings (cluster.config.EngineSettings): branch kinds in separate
    forwards, and a token budget of one window per forward, where either makes the largest
    forward smaller."""
    s, sh = plan.settings, plan.shape
    out: list[tuple[str, ModelConfig, dict]] = []
    if s.batch_cfg and model.sampling.cfg_number == 3:
        out.append(("engine.batch_cfg false (one forward per guidance branch kind)", model, {"batch_cfg": False}))
    if sh.chunks_per_forward > max(sh.window_chunks, sh.prefix_chunks):
        n = window_tokens(plan)
        label = f"engine.max_forward_tokens {n} (one {sh.window_chunks}-chunk window per forward)"
        out.append((label, model, {"max_forward_tokens": n}))
    return out


def _weight_variants(model: ModelConfig, plan: FitPlan) -> list[tuple[str, ModelConfig]]:
    """(label, model) whose smallest fitting layout is worth reporting."""
    if model.dit.fp8_quant and not plan.gpu.supports_fp8:
        return [(" with bf16 weights", _with_fp8(model, False))]
    variants = [("", model)]
    if not model.dit.fp8_quant and plan.gpu.supports_fp8:
        variants.append((" with fp8 weights", _with_fp8(model, True)))
    return variants


def options(model: ModelConfig, plan: FitPlan) -> list[tuple[str, FitPlan]]:
    """Changes toward a fit, each with its plan: single changes (more cp, more pp, fp8 or
    bf16 weights, lower resolutions, ...), then the smallest cp x pp layout that fits with
    the current weights and, where the GPU has fp8, with fp8 weights."""
    tried = []
    for label, m, changes in _candidates(model, plan):
        found = _try(m, plan, **changes)
        if found is not None:
            tried.append((label, found))
    for suffix, m in _weight_variants(model, plan):
        best = smallest_layout(m, plan)
        if best is not None:
            tried.append((f"smallest layout{suffix}: cp_size {best.settings.cp_size} x pp_size {best.settings.pp_size}",
                          best))
    return tried


def does_not_fit_message(plan: FitPlan, tried: list[tuple[str, FitPlan]]) -> str:
    """One paragraph: GPU, shortfall in GiB, the budget, and each evaluated change's outcome."""
    parts = [f"{headline(plan)} does not fit"]
    if plan.problems:
        parts.append(": " + "; ".join(plan.problems))
    else:
        parts.append(
            f": short by {_gib(plan.shortfall_bytes)} per GPU (weights {_gib(plan.weights_bytes)}"
            f" + activations {_gib(plan.activation_bytes)} + T5/VAE {_gib(plan.companion_bytes)}"
            f" + overheads {_gib(plan.overhead_bytes)} + one job {_gib(plan.gpu_bytes_per_job)}"
            f" at kv_pool_fraction {plan.settings.kv_pool_fraction} > {_gib(plan.memory_bytes)})"
        )
    if tried:
        parts.append(". Changes evaluated: " + "; ".join(f"{label} -> {_outcome(p)}" for label, p in tried))
    else:
        parts.append(". No single change (more cp, more pp, fp8, lower resolution) is valid for this model")
    return "".join(parts) + "."
