"""Multi-GPU layout of the DiT: fit planning (this package) and, later, context parallelism.

Fit planning needs no torch: :func:`plan_fit` / :func:`check_fits` turn a model config, a
GPU type and a cp x pp layout into a :class:`FitPlan` (weights, activations, KV per job,
overheads, ``max_concurrent_jobs``); :mod:`stages.parallel.profiles` loads the deployment
profiles in ``configs/profiles/``.
"""

from stages.parallel.fit import DoesNotFit, FitPlan, FitSettings, check_fits, plan_fit
from stages.parallel.gpus import GPUS, GpuSpec, get_gpu
from stages.parallel.profiles import DeploymentProfile, ProfileError, load_profile, load_profiles

__all__ = [
    "DeploymentProfile", "DoesNotFit", "FitPlan", "FitSettings", "GPUS", "GpuSpec", "ProfileError",
    "check_fits", "get_gpu", "load_profile", "load_profiles", "plan_fit",
]
