"""One compute thread per replica: model calls run there, never on the event loop.

Torch calls block; running them on the replica's asyncio loop would stall
streaming and cancellation. A single worker serialises a replica's model calls
(concurrent requests interleave call by call) so no model is entered by two
threads at once. Tagged calls (a job id) leave their wall-clock interval in a
bounded history, so tests and operators can see what ran when (e.g. that the VAE
decode of chunk k overlapped a DiT step of the same job).
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from cluster.config import DeploymentSettings, ServiceConfig
from stages.config import ModelConfig
from stages.model_store import CheckpointPaths, ensure_checkpoints

HISTORY = 1024  # tagged calls remembered per replica
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ComputeThread:
    """Runs callables in one worker thread and awaits them from the event loop."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._history: collections.deque[tuple[str, float, float]] = collections.deque(maxlen=HISTORY)

    def submit(self, fn: Callable[..., Any], *args: Any, tag: str | None = None) -> "asyncio.Future[Any]":
        """Schedule ``fn(*args)``; returns an awaitable future on the running loop."""
        work = fn if tag is None else self._timed(fn, tag)
        return asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    async def call(self, fn: Callable[..., Any], *args: Any, tag: str | None = None) -> Any:
        """``await`` the result of ``fn(*args)`` run in the compute thread."""
        return await self.submit(fn, *args, tag=tag)

    def intervals(self, tag: str) -> list[tuple[float, float]]:
        """(start, end) ``time.time()`` seconds of the remembered calls tagged ``tag``, oldest first."""
        return [(start, end) for t, start, end in self._history if t == tag]

    def _timed(self, fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            start = time.time()
            try:
                return fn(*args)
            finally:
                self._history.append((tag, start, time.time()))

        return run


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
