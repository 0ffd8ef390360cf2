"""Start-up capacity of one DiTEngine replica: the fit plan for its device and the engine limits.

:func:`replica_capacity` plans the replica described by a :class:`cluster.config.ServiceConfig`
(``parallel.cp_size`` x ``parallel.pp_size`` ranks on ``parallel.gpu`` devices, jobs of
``parallel.plan_height`` x ``parallel.plan_width``, ``parallel.kv_pool_fraction``, at most
``engine.max_active_jobs`` jobs, forwards as ``engine.batch_cfg`` and ``engine.max_forward_tokens``
run them, V2V prefix-extraction forwards of up to ``limits.max_prefix_frames``) and returns what
the engine needs::

    cap = replica_capacity(cfg, model, dtype="bfloat16")      # raises DoesNotFit
    Engine(..., **cap.engine_kwargs())   # max_active_jobs, kv_pool_blocks, batch_cfg, max_forward_tokens

Device (``parallel.gpu``):

* ``"auto"``: with CUDA, the current device as ``torch.cuda`` reports it (a known board by its
  name, :data:`cluster.capacity.gpus.GPUS`; otherwise its reported total memory); without
  CUDA, host memory (below).
* ``"cpu"``: host memory: ``MemAvailable`` of ``/proc/meminfo`` (else physical pages x page
  size) at the call, split evenly between the replica's ``cp_size * pp_size`` rank processes
  (one host). Call it before the weights are loaded, so that they are not counted twice. No
  CUDA context is planned and attention is SDPA (the engine's CPU backend).
* a GPU type key (e.g. ``"rtx-4090"``): plan against that board whatever this process sees.

A fractional ``deployments.dit_engine.num_gpus`` (0 < n < 1: replicas share a GPU) plans with
``n`` of the device's memory. The weights and the KV pool are planned in ``dtype`` (the dtype
the replica loads the DiT in, :func:`cluster.serve.compute.replica_device`; None = the model's
``params_dtype``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cluster.capacity.plan import FitPlan, FitSettings
from cluster.capacity.report import DoesNotFit, check_fits
from cluster.capacity.gpus import GpuSpec, cuda_spec, get_gpu, host_spec
from cluster.config import ConfigError, ServiceConfig
from stages.config import ModelConfig
from stages.errors import InvalidInput

SETTINGS_HINT = ("settings: parallel.cp_size, parallel.pp_size, parallel.gpu, parallel.plan_height / plan_width, "
                 "parallel.kv_pool_fraction, engine.max_active_jobs, engine.batch_cfg, engine.max_forward_tokens "
                 "(cluster.config)")


@dataclass(frozen=True)
class Capacity:
    """What one replica can hold.

    Attributes:
        plan: the fit plan of the replica's heaviest rank (:meth:`FitPlan.explain` prints it).
        max_active_jobs: jobs the engine may run at once: min(``engine.max_active_jobs``,
            what the KV pool and the activations of one packed forward admit) -> ``Engine(max_active_jobs=)``.
        kv_pool_blocks: the engine's KV-pool size in blocks (block = one chunk at the model's
            default size): ``max_active_jobs * blocks per job`` -> ``Engine(kv_pool_blocks=)``.

    The forward options the activations were planned for (``plan.settings.batch_cfg``,
    ``plan.settings.max_forward_tokens``) go to the engine with them (:meth:`engine_kwargs`).
    """

    plan: FitPlan
    max_active_jobs: int
    kv_pool_blocks: int

    @property
    def device(self) -> GpuSpec:
        return self.plan.gpu

    def engine_kwargs(self) -> dict[str, int | bool | None]:
        """``max_active_jobs``, ``kv_pool_blocks``, ``batch_cfg`` and ``max_forward_tokens`` for
        :class:`cluster.engine.Engine`: the engine runs the forwards that were planned."""
        s = self.plan.settings
        return {"max_active_jobs": self.max_active_jobs, "kv_pool_blocks": self.kv_pool_blocks,
                "batch_cfg": s.batch_cfg, "max_forward_tokens": s.max_forward_tokens}


def host_available_bytes() -> int:
    """Host memory available to new allocations, bytes (``MemAvailable``; else total RAM)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def detect_device(gpu: str, world_size: int = 1) -> GpuSpec:
    """The device to plan against for ``parallel.gpu`` (module docstring).

    Raises:
        InvalidInput: an unknown GPU type key (field ``gpu``).
    """
    if gpu == "cpu":
        return host_spec(host_available_bytes(), world_size)
    if gpu != "auto":
        return get_gpu(gpu)
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        return host_spec(host_available_bytes(), world_size)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return cuda_spec(props.name, props.total_memory, (props.major, props.minor))


def _share(spec: GpuSpec, num_gpus: float) -> GpuSpec:
    if spec.kind == "cpu" or not 0 < num_gpus < 1:
        return spec
    return GpuSpec(spec.name, f"{num_gpus:g} of {spec.description}", int(spec.memory_bytes * num_gpus),
                   spec.compute_capability, spec.device_names, spec.kind)


def _with_dtype(model: ModelConfig, dtype: str | None) -> ModelConfig:
    if dtype is None or dtype == model.dit.params_dtype:
        return model
    return model.model_copy(update={"dit": model.dit.model_copy(update={"params_dtype": dtype})})


def max_prefix_chunks(cfg: ServiceConfig, model: ModelConfig) -> int:
    """Whole prefix chunks of the longest V2V prefix ``limits.max_prefix_frames`` admits
    (:func:`cluster.scheduler.chunks.prefix_split` of its latent frames, as
    :func:`cluster.pipeline.stream.expected_frames` counts them)."""
    sp = model.sampling
    return cfg.limits.max_prefix_frames // sp.temporal_downsample_factor // sp.chunk_width


def replica_settings(cfg: ServiceConfig, device: GpuSpec, model: ModelConfig | None = None) -> FitSettings:
    """The planner settings of a replica of ``cfg`` on ``device`` (``model``: for the longest
    V2V prefix forward; None = ``cfg.load_model()``)."""
    p, e = cfg.parallel, cfg.engine
    return FitSettings(cp_size=p.cp_size, pp_size=p.pp_size, height=p.plan_height, width=p.plan_width,
                       kv_pool_fraction=p.kv_pool_fraction, max_active_jobs=e.max_active_jobs,
                       micro_batches=p.micro_batches, batch_cfg=e.batch_cfg, max_forward_tokens=e.max_forward_tokens,
                       prefix_forward_chunks=max_prefix_chunks(cfg, model or cfg.load_model()),
                       attention="sdpa" if device.kind == "cpu" else "flash")


def replica_capacity(cfg: ServiceConfig, model: ModelConfig, *, dtype: str | None = None,
                     device: GpuSpec | None = None) -> Capacity:
    """Plan the replica of ``cfg`` serving ``model`` (module docstring) and size its engine.

    Args:
        cfg: the service configuration (``parallel``, ``engine``, ``deployments.dit_engine``).
        model: the served model (``cfg.load_model()``).
        dtype: dtype name the DiT is loaded in (``"float32"``, ``"bfloat16"``); None = the
            model's ``params_dtype``.
        device: plan against this device instead of ``parallel.gpu`` (tests, what-ifs).

    Raises:
        DoesNotFit: the replica cannot hold the weights, one forward's activations and one
            job's KV region; the message gives the shortfall per GPU, the changes evaluated
            (more cp, more pp, fp8, lower resolution, engine.batch_cfg false,
            engine.max_forward_tokens) and the settings to change.
        ConfigError: ``parallel.cp_size`` / ``parallel.pp_size`` / ``parallel.plan_height`` /
            ``parallel.plan_width`` / ``parallel.gpu`` invalid for this model (key named).
    """
    p = cfg.parallel
    try:
        spec = device or _share(detect_device(p.gpu, p.world_size), cfg.deployments.dit_engine.num_gpus)
        plan = check_fits(_with_dtype(model, dtype), spec, replica_settings(cfg, spec, model))
    except InvalidInput as err:
        key = {"height": "plan_height", "width": "plan_width"}.get(err.field, err.field)
        raise ConfigError(f"parallel.{key}: {err.reason} (model {model.name})") from None
    except DoesNotFit as err:
        raise DoesNotFit(f"DiTEngine replica cannot start: {err} Change the {SETTINGS_HINT}.",
                         err.plan, err.options) from None
    return Capacity(plan=plan, max_active_jobs=plan.max_concurrent_jobs, kv_pool_blocks=plan.kv_pool_blocks)
