"""The engine a service config asks for: one construction for the DiTEngine replica
(:func:`cluster.serve.dit_start.start_engine`) and the in-process pipeline
(:class:`cluster.pipeline.local.LocalStages`), so both honour the same ``engine`` settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cluster.config import EngineSettings, ServiceConfig
from cluster.engine.async_engine import AsyncEngine, StepObserver
from cluster.engine.loop import Engine
from cluster.engine.ranks import RankGroup
from stages.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from cluster.capacity import Capacity


def engine_for(cfg: ServiceConfig, model: ModelConfig, dit_dir: Path, capacity: "Capacity", *,
               device: str = "cpu", dtype: torch.dtype = torch.float32, ranks: RankGroup | None = None) -> Engine:
    """:meth:`Engine.from_checkpoint` with ``cfg.engine``'s attention backend and queue limit and the
    admission / KV-pool sizes ``capacity`` planned (:func:`cluster.capacity.replica_capacity`).

    Raises:
        FileNotFoundError, stages.dit.weights.CheckpointMismatch, ValueError, RuntimeError: see
            :meth:`Engine.from_checkpoint`.
    """
    return Engine.from_checkpoint(model, dit_dir, device=device, dtype=dtype, ranks=ranks,
                                  attention=cfg.engine.attention, queue_limit=cfg.engine.queue_limit,
                                  **capacity.engine_kwargs())


def async_engine_for(engine: Engine, settings: EngineSettings, on_step: StepObserver | None = None) -> AsyncEngine:
    """The asyncio front of ``engine`` with the settings' backpressure bounds
    (``max_buffered_chunks``, ``paused_timeout_s``)."""
    return AsyncEngine(engine, on_step=on_step, max_buffered_chunks=settings.max_buffered_chunks,
                       paused_timeout_s=settings.paused_timeout_s)
