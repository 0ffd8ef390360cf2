"""What to change when a replica does not fit: :func:`check_fits` raises :class:`DoesNotFit`
with every evaluated change (more cp, more pp, fp8 or bf16 weights, lower resolution, engine
forward settings) and its outcome. The plan's own table is :func:`cluster.capacity.plan.explain`."""

from __future__ import annotations

from cluster.capacity.fit import plan_fit
from cluster.capacity.gpus import GpuSpec
from cluster.capacity.plan import FitPlan, FitSettings, gib, headline, window_tokens
from stages.config import ModelConfig
from stages.errors import InvalidInput

MAX_GPUS_SEARCHED = 16
RESOLUTION_SCALES = (0.75, 2 / 3, 0.5)


def _outcome(plan: FitPlan) -> str:
    if plan.fits:
        return f"fits, {plan.max_concurrent_jobs} job(s)"
    if plan.problems:
        return "; ".join(plan.problems)
    return f"short by {gib(plan.shortfall_bytes)}"


def _try(model: ModelConfig, plan: FitPlan, **changes) -> FitPlan | None:
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
            f": short by {gib(plan.shortfall_bytes)} per GPU (weights {gib(plan.weights_bytes)}"
            f" + activations {gib(plan.activation_bytes)}"
            f" + overheads {gib(plan.overhead_bytes)} + one job {gib(plan.gpu_bytes_per_job)}"
            f" at kv_pool_fraction {plan.settings.kv_pool_fraction} > {gib(plan.memory_bytes)})"
        )
    if tried:
        parts.append(". Changes evaluated: " + "; ".join(f"{label} -> {_outcome(p)}" for label, p in tried))
    else:
        parts.append(". No single change (more cp, more pp, fp8, lower resolution) is valid for this model")
    return "".join(parts) + "."


class DoesNotFit(RuntimeError):
    """A replica layout cannot hold the model and one job; the message says what to change.

    Attributes:
        plan: the failing :class:`FitPlan`.
        options: ``(change, plan)`` pairs that were tried (see :func:`options`).
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
    plan = plan_fit(model, gpu, settings)
    if plan.fits:
        return plan
    tried = options(model, plan)
    raise DoesNotFit(does_not_fit_message(plan, tried), plan, tried)
