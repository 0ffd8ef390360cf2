"""Exact resume of a job from a step boundary (e.g. on another replica after a failure).

What resume needs, precisely: chunk c's trajectory depends on the *noisy* intermediate
states of the chunks in flight beside it (they attend to each other at every step), so the
clean latents of earlier chunks (or their K/V alone) are not enough. A :class:`JobSnapshot`
taken between two engine steps holds everything the remaining steps read:

* the scheduler position (denoising forwards done, prefix extraction done),
* the latents of the chunks in flight (at most ``window_size`` chunks, float32),
* the K/V of the clean chunks in the ring (at most ``max(noise2clean_kvrange) - 1`` chunks,
  per layer; chunks below the plans' ``kv_keep_from`` are never read again),
* the RoPE base, the highest started chunk and the prompt segments (with updates).
Noise of chunks not yet started comes from the job seed: generator seeded by (seed, chunk).
``Engine.submit(job, resume=snapshot)`` restores it; the chunks it emits from then on are
bitwise equal to the uninterrupted run's (tests/model/test_engine_streams.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.engine.prepare import JobPreparer, JobState
from stages.errors import InvalidInput


@dataclass(frozen=True)
class JobSnapshot:
    """A job's state between two steps (see module docstring). Tensors are CPU copies.

    Attributes:
        job_id: the job; steps_done: denoising forwards run; prefix_done: V2V prefix K/V
        extracted; chunks_emitted: chunks already delivered (the resumed job emits from
        index ``chunks_emitted`` on); latents: global chunk -> (C, chunk_width, h, w);
        kv: global chunk -> per-layer (k, v) (tokens_per_chunk, G, Dh); rope_base,
        max_started: see :class:`cluster.engine.job.JobContext`; segments: prompt segments
        (start_chunk, y (L, D), mask (L,)).
    """

    job_id: str
    steps_done: int
    prefix_done: bool
    chunks_emitted: int
    latents: dict[int, torch.Tensor]
    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
    rope_base: int
    max_started: int
    segments: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]

    @property
    def nbytes(self) -> int:
        lat = sum(t.numel() * t.element_size() for t in self.latents.values())
        kv = sum(t.numel() * t.element_size() for layers in self.kv.values() for pair in layers for t in pair)
        return lat + kv


def take(st: JobState) -> JobSnapshot:
    """Snapshot an active job between steps.

    Raises:
        InvalidInput("job_id"): the job is not active (no KV to save).
    """
    if st.state != "active" or st.ctx.kv is None:
        raise InvalidInput("job_id", f"job {st.job_id!r} is {st.state}; only an active job can be snapshot")
    ctx, sched = st.ctx, st.sched
    return JobSnapshot(
        job_id=st.job_id, steps_done=sched.steps_done,
        prefix_done=sched.chunk_offset > 0 and (sched.steps_done > 0 or bool(ctx.kv.chunks)),
        chunks_emitted=len(sched.emitted), latents={c: t.cpu().clone() for c, t in ctx.latents.items()},
        kv=ctx.kv.export(), rope_base=ctx.kv.ring.rope_base, max_started=ctx.max_started,
        segments=tuple((s, y.cpu().clone(), m.cpu().clone()) for s, y, m in ctx.captions.segments),
    )


def check(st: JobState, snap: JobSnapshot) -> None:
    """Validate that ``snap`` belongs to the job ``st`` describes.

    Raises:
        InvalidInput("resume"): different job id or latent shape.
    """
    if snap.job_id != st.job_id:
        raise InvalidInput("resume", f"snapshot of job {snap.job_id!r} cannot resume job {st.job_id!r}")
    shape = st.ctx.noise.shape
    for c, lat in snap.latents.items():
        if tuple(lat.shape) != shape:
            raise InvalidInput("resume", f"snapshot latent of chunk {c} is {tuple(lat.shape)}, job needs {shape}")


def restore(st: JobState, snap: JobSnapshot) -> None:
    """Apply ``snap`` to a freshly admitted job (its KV region allocated)."""
    ctx = st.ctx
    JobPreparer.fast_forward(st.sched, snap.steps_done, snap.prefix_done)
    dev = ctx.captions.null_y.device  # the engine's device
    ctx.latents = {c: t.to(dev).clone() for c, t in snap.latents.items()}
    ctx.kv.load(snap.kv)
    ctx.kv.ring.rope_base, ctx.max_started = snap.rope_base, snap.max_started
    ctx.captions.segments = [(s, y.to(dev), m.to(dev)) for s, y, m in snap.segments]
    ctx.captions._cache.clear()
