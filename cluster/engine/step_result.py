"""One engine step as the async engine's compute thread takes it (plain Python): the step's
events plus what the event loop needs to route them without calling the engine again."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cluster.engine.events import JobHandle
from cluster.engine.loop import Engine
from cluster.engine.stats import EngineStats
from cluster.messages import JobFinished


@dataclass
class StepResult:
    """What one engine step gave (built in the compute thread)."""

    events: list
    ran: tuple[str, ...]  # jobs in the step's forward
    interval: tuple[float, float]  # time.time() start, end
    stats: EngineStats
    timings: dict[str, tuple[float | None, float | None]]  # job -> (ttfc_s, tpoc_s) of jobs that ran
    has_work: bool


def take_step(engine: Engine, handles: dict[str, JobHandle]) -> StepResult:
    """``engine.step()`` with its wall interval, the jobs it ran and their TTFC / TPOC (read
    from ``handles``, job id -> handle; finished jobs are dropped from it), ``engine.stats()``
    and ``engine.has_work``. Call it from the thread that owns ``engine``."""
    before, start = engine.last_step, time.time()
    events = engine.step()
    end, after = time.time(), engine.last_step
    ran = after.job_ids if after is not None and after is not before else ()
    timings = {j: (h.ttfc_s, h.tpoc_s) for j in ran if (h := handles.get(j)) is not None}
    for event in events:
        if isinstance(event, JobFinished):
            handles.pop(event.job_id, None)
    return StepResult(events, ran, (start, end), engine.stats(), timings, engine.has_work)
