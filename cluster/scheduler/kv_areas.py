"""How many chunks of K/V one job's KV-pool region holds, per area (plain Python, no torch).

Areas (their placement inside the region: :mod:`cluster.scheduler.kv_ring`): ``history`` = the
ring of clean chunks later plans still read plus the window of the history branch
(:func:`stages.sampling.history_branch`: cfg_number 3 ``cond_prev``, cfg_number 1
``cond_prev_text``); ``text`` = the ``cond_prev_text`` window of cfg 3 (W + 1 chunks);
``uncond`` = the ``uncond`` branch's chunks (cfg 3, W); ``self_only`` = the distillation
blend's self-only chunk (cfg 1, 1).
The engine, the fit planner (:mod:`cluster.capacity.kv`) and admission all size a job by
these functions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from cluster.scheduler.stagger import StaggerSpec
from stages.config import SamplingConfig


@dataclass(frozen=True)
class KVAreas:
    """Chunk capacities of the areas of one job's region (see module docstring)."""

    history: int
    text: int = 0
    uncond: int = 0
    self_only: int = 0

    @property
    def total(self) -> int:
        return self.history + self.text + self.uncond + self.self_only


def history_span(spec: StaggerSpec) -> int:
    """Most chunks [kv_keep_from, window end) any forward of ``spec``'s endless walk needs
    (and the prefix chunks of a V2V prefix extraction). The walk is periodic once the window
    is full, so stagger indices up to W + max range + 2 cover every case."""
    walk = spec.endless
    ranges = [*walk.noise2clean_kvrange, max(1, walk.clean_chunk_kvrange)]
    indices = walk.window_size + max(ranges) + 2
    span = walk.chunk_offset
    for g in range(walk.per * indices):
        plan = walk.plan(g, kv_keep_from=walk.keep_from(g))
        span = max(span, plan.slots[-1].chunk + 1 - plan.kv_keep_from)
    return span


def kv_areas(spec: StaggerSpec, cfg_number: int, keep_all: bool = False) -> KVAreas:
    """Areas a job with stagger ``spec`` needs (``keep_all``: ``history`` = every chunk). Without
    KV ranges (``noise2clean_kvrange`` empty: full causal attention) every chunk stays
    readable, so the job is kept whole as with ``keep_all``.

    Raises:
        ValueError: every chunk must be kept (``keep_all`` or full causal) but the job is endless.
    """
    whole = keep_all or not spec.noise2clean_kvrange
    if whole and spec.num_chunks is None:
        raise ValueError("an endless job needs bounded KV ranges (noise2clean_kvrange) and the ring, not keep_all")
    history = spec.num_chunks if whole else history_span(spec)
    w = spec.window_size
    if cfg_number == 3:
        return KVAreas(history=history, text=w + 1, uncond=w)
    return KVAreas(history=history, self_only=1)


def job_blocks(areas: KVAreas, tokens_per_chunk: int, block_tokens: int) -> int:
    """KV-pool blocks of a job's region: ``ceil(areas.total * tokens_per_chunk / block_tokens)``."""
    return math.ceil(areas.total * tokens_per_chunk / block_tokens)


@functools.lru_cache(maxsize=64)
def default_job_areas(sp: SamplingConfig, prefix_chunks: int = 0) -> KVAreas:
    """KV areas (:func:`kv_areas`) of an endless T2V job at the default step count (a 16-chunk
    job when the KV ranges are unbounded), or of a V2V job bringing ``prefix_chunks`` whole
    prefix chunks: what the engine reserves per job. The areas depend on chunk geometry only
    (window, KV ranges, stagger indices), not on timestep values, so the walk runs on a uniform schedule."""
    n = sp.num_steps
    spec = StaggerSpec(
        num_chunks=None if sp.noise2clean_kvrange else 16, window_size=sp.window_size, num_steps=n,
        t_schedule=tuple(i / n for i in range(n + 1)), distill_intervals=(1.0,) * n, chunk_offset=prefix_chunks,
        noise2clean_kvrange=tuple(sp.noise2clean_kvrange), clean_chunk_kvrange=sp.clean_chunk_kvrange,
        clean_t=sp.clean_t,
    )
    return kv_areas(spec, sp.cfg_number, keep_all=False)
