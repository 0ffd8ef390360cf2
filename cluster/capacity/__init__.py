"""Capacity planning of DiT engine replicas: does a model fit a GPU layout, and how many jobs
does the engine's KV pool admit?

* :func:`plan_fit` (:mod:`cluster.capacity.fit`) / :func:`check_fits`
  (:mod:`cluster.capacity.report`): a model config, a GPU type and a cp x pp layout ->
  :class:`FitPlan` (weights, activations, the engine's KV pool sized with the engine's own arithmetic (:mod:`cluster.capacity.kv`), overheads,
  ``max_concurrent_jobs``); :class:`DoesNotFit` says what to change.
* :func:`replica_capacity` (:mod:`cluster.capacity.replica`): the start-up check of a
  DiTEngine replica from the service config -> :class:`Capacity` (``max_active_jobs``,
  ``kv_pool_blocks`` for :class:`cluster.engine.Engine`).
* deployment profiles in ``configs/profiles/`` (:mod:`cluster.capacity.profiles`, not imported
  here so that ``python -m cluster.capacity.profiles [FILE...]`` runs it cleanly: it prints
  each profile's plan).
"""

from cluster.capacity.fit import FitPlan, FitSettings, plan_fit
from cluster.capacity.gpus import GPUS, GpuSpec, get_gpu
from cluster.capacity.replica import Capacity, replica_capacity
from cluster.capacity.report import DoesNotFit, check_fits

__all__ = [
    "Capacity", "DoesNotFit", "FitPlan", "FitSettings", "GPUS", "GpuSpec", "check_fits", "get_gpu", "plan_fit",
    "replica_capacity",
]
