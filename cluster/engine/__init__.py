"""DiT engine: continuous batching of chunk-wise jobs over one DiT (never imports ray).

See :mod:`cluster.engine.loop` for the API (``Engine.submit / step / cancel / update_prompt /
snapshot / stats``) and
:mod:`cluster.engine.async_engine` for its asyncio front (``AsyncEngine.submit / events /
cancel / update_prompt / stats``), which the DiTEngine deployment wraps.
"""

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.errors import EngineBusy, JobCancelled, JobFailed, JobNotFound
from cluster.engine.events import JobHandle, StepInfo
from cluster.messages import JobAdmitted, JobFinished
from cluster.engine.loop import Engine
from cluster.engine.snapshot import JobSnapshot
from cluster.engine.stats import EngineStats, Histogram, HistogramSnapshot, JobStat

__all__ = [
    "AsyncEngine", "Engine", "EngineBusy", "EngineStats", "Histogram", "HistogramSnapshot", "JobAdmitted",
    "JobCancelled", "JobFailed", "JobFinished", "JobHandle", "JobNotFound", "JobSnapshot", "JobStat",
    "StepInfo",
]
