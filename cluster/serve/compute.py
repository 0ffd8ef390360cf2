"""Start-up helpers of the model deployments (Ray-free): torch threads, checkpoints, device.

The deployments run their model calls in a :class:`cluster.engine.compute.ComputeThread`.
"""

from __future__ import annotations

import torch

from cluster.config import DeploymentSettings, ServiceConfig
from stages.config import ModelConfig
from stages.model_store import CheckpointPaths, ensure_checkpoints


def prepare_replica(cfg: ServiceConfig, settings: DeploymentSettings) -> tuple[ModelConfig, CheckpointPaths]:
    """Start-up shared by the model deployments: torch threads, model config, checkpoint folders.

    ``settings.torch_threads`` caps torch's intra-op threads for this process (None
    leaves Ray's OMP_NUM_THREADS: 1 for a fractional num_cpus).
    """
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model = cfg.load_model()
    return model, ensure_checkpoints(model, cfg.checkpoint_root)


def replica_device(settings: DeploymentSettings) -> tuple[str, str]:
    """(device, weight dtype name) of a model replica: ``cuda`` / ``bfloat16`` when the
    deployment reserves GPUs (``num_gpus`` > 0; Ray sets the visible device), else ``cpu`` /
    ``float32``.

    Raises:
        RuntimeError: GPUs are reserved but CUDA is not available in the replica.
    """
    if settings.num_gpus <= 0:
        return "cpu", "float32"
    if not torch.cuda.is_available():
        raise RuntimeError(f"num_gpus {settings.num_gpus} reserved but torch.cuda is not available in this replica")
    return "cuda", "bfloat16"
