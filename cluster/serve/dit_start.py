"""Start-up of a DiTEngine replica's engine: capacity check, the parallel mesh's other ranks
(Ray actors, :mod:`cluster.serve.ranks`), then rank 0's DiT."""

from __future__ import annotations

import logging

from cluster.capacity import replica_capacity
from cluster.config import ServiceConfig
from cluster.engine import Engine
from cluster.engine.service import engine_for
from cluster.serve.compute import prepare_replica, replica_device
from cluster.serve.ranks import start_rank_group
from stages.dtypes import torch_dtype

log = logging.getLogger(__name__)


def start_engine(cfg: ServiceConfig) -> Engine:
    """The replica's engine: capacity check first (before any weights are loaded or checkpoints
    looked for), then the parallel mesh's other ranks (if any), then rank 0's DiT.

    Raises:
        cluster.capacity.DoesNotFit: the model cannot fit the replica's devices (the replica
            refuses to start; the message says what is short and what to change).
        ValueError / RuntimeError: a mesh the model cannot be split into, an attention backend
            that cannot run, ranks that did not start (see :func:`cluster.serve.ranks.start_rank_group`).
    """
    settings = cfg.deployments.dit_engine
    device, dtype = replica_device(settings)
    capacity = replica_capacity(cfg, cfg.load_model(), dtype=dtype)
    model, paths = prepare_replica(cfg, settings)
    log.info("DiTEngine capacity: %d jobs, %d KV-pool blocks\n%s", capacity.max_active_jobs,
             capacity.kv_pool_blocks, capacity.plan.explain())
    ranks = None
    if cfg.parallel.world_size > 1:
        ranks = start_rank_group(cfg.parallel, settings, model, str(paths.dit), device, dtype, settings.torch_threads,
                                 attention=cfg.engine.attention)
    return engine_for(cfg, model, paths.dit, capacity, device=device, dtype=torch_dtype(dtype), ranks=ranks)
