"""DiT engine: continuous batching of chunk-wise jobs over one DiT (never imports ray).

See :mod:`cluster.engine.loop` for the API (``Engine.submit / step / cancel / update_prompt /
snapshot / stats`` and the single-job ``Engine.start -> JobRun``).
"""

from cluster.engine.errors import EngineBusy, JobNotFound
from cluster.engine.events import JobAdmitted, JobFinished, JobHandle, StepInfo
from cluster.engine.loop import Engine, JobRun
from cluster.engine.snapshot import JobSnapshot
from cluster.engine.stats import EngineStats, Histogram, HistogramSnapshot, JobStat

__all__ = [
    "Engine", "EngineBusy", "EngineStats", "Histogram", "HistogramSnapshot", "JobAdmitted", "JobFinished",
    "JobHandle", "JobNotFound", "JobRun", "JobSnapshot", "JobStat", "StepInfo",
]
