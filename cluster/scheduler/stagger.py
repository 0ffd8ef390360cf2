"""Stateless stagger geometry of the MAGI-1 chunk pipeline (plain Python, no torch).

Reproduces the reference ``generate_sequences`` + ``SampleTransport.walk``
(DESIGN.md section 3, "Stagger" and "KV cache"): window W = window_size,
per = num_steps // W steps per stagger index (the reference's "stage"). At global forward g (prefix extraction
not counted) the stagger index is s = g // per, the index inside it d = g % per, and
with i = chunk_offset + s the window holds chunks
[max(chunk_offset, i - W + 1), min(num_chunks, i + 1)); chunk c is at step
index k_c = (i - c) * per + d (the oldest chunk at the highest index). At
d = 0 of every stagger index whose first chunk is past the prefix, the previous
(now clean) chunk is re-forwarded first at clean_t to write its K/V.
A query chunk c at step k attends to chunks [max(0, c + 1 - R), c + 1) with
R = noise2clean_kvrange[k // (num_steps // len(noise2clean_kvrange))]
(reference ``generate_noise2clean_kvrange``).

Every method is a pure function of the spec and the step index; ``num_chunks``
None describes an endless stream whose plans equal a finite job's wherever
the finite job's window has not reached its last chunk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from functools import cached_property

from cluster.scheduler.plan import ChunkSlot, SlotRole, StepPlan
from stages.errors import InvalidInput

PREFIX_DEFAULT_KVRANGE = 8  # reference ``generate_kvrange_for_prefix_video`` fallback


def generate_sequences(chunk_num: int, window_size: int, chunk_offset: int) -> tuple[list[int], ...]:
    """Per-stagger-index (clip_start, clip_end, t_start, t_end) lists, as the reference ``generate_sequences``.

    Stage s covers chunks [clip_start[s], clip_end[s]); t_start/t_end index
    the window positions (in units of ``per`` steps) of those chunks.
    """
    idx = range(chunk_offset, chunk_num + window_size - 1)
    clip_start = [max(chunk_offset, i - window_size + 1) for i in idx]
    clip_end = [min(chunk_num, i + 1) for i in idx]
    t_start = [max(0, i - chunk_num + 1) for i in idx]
    t_end = [min(window_size, i - chunk_offset + 1) for i in idx]
    return clip_start, clip_end, t_start, t_end


def to_float32(x: float) -> float:
    """Round a Python float to the nearest float32 value (what a float32 tensor holds)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _int_at_least(field: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInput(field, f"must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class StaggerSpec:
    """The static settings of one job's walk (reference ``runtime_config`` names).

    Attributes:
        num_chunks: chunks incl. prefix chunks (reference ``chunk_num``), None = endless.
        window_size: W, chunks in flight.
        num_steps: N, denoising steps per chunk (multiple of W).
        t_schedule: N + 1 float32-exact timesteps (``stages.sampling.init_t(...).tolist()``).
        distill_intervals: N shortcut multipliers (``stages.sampling.init_intervals``).
        chunk_offset: whole V2V prefix chunks (global chunks 0 .. chunk_offset - 1).
        noise2clean_kvrange: KV range in chunks per quarter of the schedule; empty = full causal.
        clean_chunk_kvrange: KV range of a re-forwarded clean chunk; -1 = noise2clean_kvrange[-1].
        clean_t: timestep of clean re-forward and prefix extraction.
        distill_nearly_clean_chunk_threshold: see ``StepPlan.distill_nearly_clean_chunk``.
    """

    num_chunks: int | None
    window_size: int
    num_steps: int
    t_schedule: tuple[float, ...]
    distill_intervals: tuple[float, ...]
    chunk_offset: int = 0
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    clean_t: float = 0.9999
    distill_nearly_clean_chunk_threshold: float = 0.3

    def __post_init__(self) -> None:
        _int_at_least("window_size", self.window_size, 1)
        _int_at_least("num_steps", self.num_steps, 1)
        _int_at_least("chunk_offset", self.chunk_offset, 0)
        if self.num_steps % self.window_size:
            raise InvalidInput("num_steps", f"{self.num_steps} is not a multiple of window_size {self.window_size}")
        if self.num_chunks is not None and _int_at_least("num_chunks", self.num_chunks, 1) <= self.chunk_offset:
            raise InvalidInput("num_chunks", f"{self.num_chunks} leaves no chunk after {self.chunk_offset} prefix chunks")
        if len(self.t_schedule) != self.num_steps + 1:
            raise InvalidInput("t_schedule", f"needs num_steps + 1 = {self.num_steps + 1} values, got {len(self.t_schedule)}")
        if len(self.distill_intervals) != self.num_steps:
            raise InvalidInput("distill_intervals", f"needs {self.num_steps} values, got {len(self.distill_intervals)}")
        for r in self.noise2clean_kvrange:
            _int_at_least("noise2clean_kvrange", r, 1)
        if self.noise2clean_kvrange and self.num_steps % len(self.noise2clean_kvrange):
            raise InvalidInput(
                "noise2clean_kvrange", f"num_steps {self.num_steps} is not a multiple of {len(self.noise2clean_kvrange)} ranges"
            )
        if self.clean_chunk_kvrange != -1:
            _int_at_least("clean_chunk_kvrange", self.clean_chunk_kvrange, 1)

    # ----- static quantities -------------------------------------------------
    @property
    def per(self) -> int:
        """Steps per stagger index (reference ``denoise_step_per_stage``)."""
        return self.num_steps // self.window_size

    @property
    def total_forwards(self) -> int | None:
        """per * (num_chunks + W - 1 - chunk_offset) (reference ``total_forward_step``); None if endless."""
        if self.num_chunks is None:
            return None
        return self.per * (self.num_chunks + self.window_size - 1 - self.chunk_offset)

    @property
    def clean_t32(self) -> float:
        return to_float32(self.clean_t)

    def _range_of_step(self, k: int) -> int | None:
        ranges = self.noise2clean_kvrange
        return ranges[k // (self.num_steps // len(ranges))] if ranges else None

    def _clean_range(self) -> int | None:
        if not self.noise2clean_kvrange:
            return None
        return self.noise2clean_kvrange[-1] if self.clean_chunk_kvrange == -1 else self.clean_chunk_kvrange

    def _prefix_range(self) -> int:
        if self.clean_chunk_kvrange != -1:
            return self.clean_chunk_kvrange
        return self.noise2clean_kvrange[-1] if self.noise2clean_kvrange else PREFIX_DEFAULT_KVRANGE

    @staticmethod
    def _kv(chunk: int, span: int | None) -> tuple[int, int]:
        return (0 if span is None else max(0, chunk + 1 - span), chunk + 1)

    def _max_span(self) -> int | None:
        if not self.noise2clean_kvrange:
            return None
        return max(*self.noise2clean_kvrange, self._clean_range() or 1)

    # ----- windows -----------------------------------------------------------
    def window(self, stagger_index: int) -> tuple[int, int]:
        """[first, end) denoising chunks of ``stagger_index`` (reference clip_start/clip_end)."""
        i = self.chunk_offset + stagger_index
        end = i + 1 if self.num_chunks is None else min(self.num_chunks, i + 1)
        return max(self.chunk_offset, i - self.window_size + 1), end

    # ----- plans -------------------------------------------------------------
    def plan(self, g: int, kv_keep_from: int = 0) -> StepPlan:
        """The :class:`StepPlan` of global forward ``g`` (0-based, prefix extraction excluded)."""
        total = self.total_forwards
        if g < 0 or (total is not None and g >= total):
            raise IndexError(f"global step {g} outside 0..{total}")
        stagger_index, d = divmod(g, self.per)
        i = self.chunk_offset + stagger_index
        first, end = self.window(stagger_index)
        reforward = first > self.chunk_offset and d == 0
        slots = []
        if reforward:
            slots.append(ChunkSlot(first - 1, SlotRole.CLEAN_REFORWARD, self.clean_t32, None, None,
                                   self._kv(first - 1, self._clean_range())))
        for c in range(first, end):
            k = (i - c) * self.per + d
            slots.append(ChunkSlot(c, SlotRole.DENOISE, self.t_schedule[k], k, self.t_schedule[k + 1],
                                   self._kv(c, self._range_of_step(k))))
        oldest_k = (i - first) * self.per + d
        return StepPlan(
            global_step=g,
            stagger_index=stagger_index,
            denoise_idx=d,
            slots=tuple(slots),
            slice_point=first - 1 if reforward else first,
            kv_write_chunks=(first - 1,) if reforward else (),
            distill_nearly_clean_chunk=self.t_schedule[oldest_k] > self.distill_nearly_clean_chunk_threshold,
            distill_interval=float(self.distill_intervals[d]),
            emits=(first,) if oldest_k == self.num_steps - 1 else (),
            kv_keep_from=kv_keep_from,
        )

    def prefix_plan(self, kv_keep_from: int = 0) -> StepPlan:
        """The V2V prefix KV extraction forward (reference ``extract_prefix_video_feature``), chunk_offset > 0."""
        if self.chunk_offset <= 0:
            raise ValueError("prefix_plan needs chunk_offset > 0")
        span = self._prefix_range()
        slots = tuple(
            ChunkSlot(c, SlotRole.PREFIX, self.clean_t32, None, None, self._kv(c, span)) for c in range(self.chunk_offset)
        )
        return StepPlan(
            global_step=0, stagger_index=-1, denoise_idx=0, slots=slots, slice_point=0,
            kv_write_chunks=tuple(range(self.chunk_offset)), distill_nearly_clean_chunk=False,
            distill_interval=float(self.distill_intervals[0]), emits=(), is_prefix_extraction=True,
            kv_keep_from=kv_keep_from,
        )

    # ----- KV ring bookkeeping ----------------------------------------------
    def cache_floor(self, g: int) -> int:
        """Smallest chunk forward ``g`` needs below its window: min(slice_point, smallest KV range start).

        Chunks below it are neither read from the KV cache nor part of the
        model input of this forward. Same value as building :meth:`plan` (g).
        """
        stagger_index, d = divmod(g, self.per)
        i = self.chunk_offset + stagger_index
        first, end = self.window(stagger_index)
        floor = first
        if first > self.chunk_offset and d == 0:
            floor = self._kv(first - 1, self._clean_range())[0]
        for c in range(first, end):
            floor = min(floor, self._kv(c, self._range_of_step((i - c) * self.per + d))[0])
        return floor

    @cached_property
    def endless(self) -> "StaggerSpec":
        """This spec with num_chunks None (the endless stream it agrees with)."""
        return self if self.num_chunks is None else replace(self, num_chunks=None)

    def keep_from(self, g: int) -> int:
        """min over forwards g' >= g of the endless walk of :meth:`cache_floor` (the KV ring's lower edge).

        Computed on the endless walk so that a finite job's value equals the
        stream's; it is a lower bound of what the finite job still reads (its
        windows are the endless ones cut at num_chunks). The search stops at the
        first stagger index whose smallest possible read, max(0, first_chunk - max_range),
        cannot go below the best found so far.
        """
        spec = self.endless
        span = spec._max_span()
        stagger_index, d = divmod(g, spec.per)
        best = min(spec.cache_floor(stagger_index * spec.per + j) for j in range(d, spec.per))
        while best > 0 and span is not None:
            stagger_index += 1
            if max(0, spec.window(stagger_index)[0] - span) >= best:
                break
            best = min(best, *(spec.cache_floor(stagger_index * spec.per + j) for j in range(spec.per)))
        return best
