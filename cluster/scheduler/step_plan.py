"""One engine step's plan: which jobs run, their windows and the KV moves before the forward
(plain Python; DESIGN.md section 2, plan -> execute -> update).

The engine hands every active job's chunk scheduler and KV ring to :func:`plan_step`, executes
the returned :class:`EngineStepPlan` (KV moves, RoPE key rotation, one packed forward) and
reports back with :func:`update_job` per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cluster.scheduler.chunk_scheduler import ChunkScheduler
from cluster.scheduler.kv_ring import KVMove, KVRing
from cluster.scheduler.plan import StepPlan, StepResult


@dataclass(frozen=True)
class JobPlan:
    """One job's part of an engine step.

    Attributes:
        job_id: the job; window: its forward (:class:`StepPlan`: chunks, timesteps, KV ranges).
        kv_moves: chunk copies inside the job's region, in order, before the forward
            (:meth:`KVRing.prepare`).
        rope_jump: chunks the job's RoPE base moved (0: none): the held chunks' keys are
            rotated back by ``rope_jump * chunk_width`` latent frames after the moves.
        rope_base: the job's RoPE base for this forward (global chunk at time position 0).
    """

    job_id: str
    window: StepPlan
    kv_moves: tuple[KVMove, ...] = ()
    rope_jump: int = 0
    rope_base: int = 0


@dataclass(frozen=True)
class EngineStepPlan:
    """Plan of one engine step.

    Attributes:
        jobs: the jobs that run, in the given order.
        finished: jobs with no forward left (they leave without running).
        failed: (job_id, error) of jobs whose KV state cannot serve their next window (a bug;
            they fail alone).
    """

    jobs: tuple[JobPlan, ...]
    finished: tuple[str, ...] = ()
    failed: tuple[tuple[str, Exception], ...] = ()


def plan_job(job_id: str, window: StepPlan, ring: KVRing, rope_horizon: int | None) -> JobPlan:
    """The KV side of ``window``: RoPE base jump (:meth:`KVRing.rope_jump`), then room in the
    history area (:meth:`KVRing.prepare`).

    Raises:
        RuntimeError: see :meth:`KVRing.prepare`.
    """
    jump = ring.rope_jump(window, rope_horizon)
    moves = ring.prepare(window)
    return JobPlan(job_id, window, moves, jump, ring.rope_base)


def plan_step(jobs: Sequence[tuple[str, ChunkScheduler, KVRing]], rope_horizon: int | None) -> EngineStepPlan:
    """Next forward of every job ``(job_id, scheduler, ring)``, in order.

    Args:
        rope_horizon: RoPE re-basing horizon in chunks (:mod:`cluster.scheduler.kv_ring`);
            None = absolute positions.
    """
    plans, finished, failed = [], [], []
    for job_id, sched, ring in jobs:
        window = sched.next_plan()
        if window is None:  # finished without a pending step (defensive; jobs leave when done)
            finished.append(job_id)
            continue
        try:
            plans.append(plan_job(job_id, window, ring, rope_horizon))
        except Exception as err:  # noqa: BLE001 - one job's bad KV state fails that job alone
            failed.append((job_id, err))
    return EngineStepPlan(tuple(plans), tuple(finished), tuple(failed))


def update_job(sched: ChunkScheduler, ring: KVRing, plan: JobPlan, emitted: Sequence[int]) -> None:
    """After ``plan`` ran: its written chunks are held, old ones released (:meth:`KVRing.commit`),
    and the scheduler moves on (:meth:`ChunkScheduler.update`)."""
    ring.commit(plan.window)
    sched.update(StepResult(global_step=plan.window.global_step, emitted=tuple(emitted)))
