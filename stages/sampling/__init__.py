"""Sampling math of the MAGI-1 chunk pipeline: schedules, Euler step, guidance (branch
selection and combination: :mod:`stages.sampling.guidance`).

Pure functions without hidden state (DESIGN.md section 3); the chunk
staggering that decides which chunk is at which step lives in the plain-Python
:mod:`cluster.scheduler.chunk_scheduler`, fed with ``init_t(...).tolist()`` and
``init_intervals(...)``.
"""

from stages.sampling.euler import euler_step
from stages.sampling.guidance import (
    Branch,
    Guidance,
    cfg_scales,
    combine_cfg3,
    distill_blend,
    guided_velocity,
    history_branch,
    select_branches,
)
from stages.sampling.schedule import SHORTCUT_MODES, distill_step_size, init_intervals, init_t

__all__ = [
    "Branch",
    "Guidance",
    "SHORTCUT_MODES",
    "cfg_scales",
    "combine_cfg3",
    "distill_blend",
    "distill_step_size",
    "euler_step",
    "guided_velocity",
    "history_branch",
    "init_intervals",
    "init_t",
    "select_branches",
]
