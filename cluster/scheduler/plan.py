"""Plain-data messages between the chunk scheduler and the engine runner.

The scheduler (plain Python, no torch) emits one :class:`StepPlan` per DiT
forward of a job and consumes one :class:`StepResult` after the runner executed
it. Chunk indices are global (prefix chunks included); timesteps are floats on
the MAGI-1 convention t in [0, 1], 0 = pure noise, 1 = clean (DESIGN.md
section 3; reference ``SampleTransport.walk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class SlotRole(str, Enum):
    """Why a chunk is part of a forward."""

    DENOISE = "denoise"  # a noisy chunk integrated by this step
    CLEAN_REFORWARD = "clean_reforward"  # a just-cleaned chunk re-forwarded at clean_t to write its K/V
    PREFIX = "prefix"  # a V2V prefix chunk forwarded once to write its K/V


@dataclass(frozen=True)
class ChunkSlot:
    """One chunk of the model input window.

    Attributes:
        chunk: global chunk index.
        role: see :class:`SlotRole`.
        t: timestep fed to the DiT for this chunk (clean_t for re-forward/prefix).
        step_index: denoise step index k (t = T[k]); None unless role is DENOISE.
        t_next: integration target T[k + 1]; None unless role is DENOISE.
        kv_range: [start, end) in global chunk units of the keys this chunk's
            queries attend to (cached chunks followed by the current window).
    """

    chunk: int
    role: SlotRole
    t: float
    step_index: int | None
    t_next: float | None
    kv_range: tuple[int, int]


@dataclass(frozen=True)
class StepPlan:
    """One DiT forward of one job (reference ``forward_dispatcher`` call).

    Attributes:
        global_step: forward counter of the job, 0-based (prefix extraction is
            its own plan with ``is_prefix_extraction`` and the same step 0).
        stagger_index: window position (reference ``stage``), -1 for prefix extraction.
        denoise_idx: index inside the stagger index, 0 .. num_steps // window_size - 1.
        slots: the model-input chunks in order (clean re-forward chunk first).
        slice_point: chunks < slice_point are read from the job's KV cache, never
            recomputed; the current window starts at global chunk ``slots[0].chunk``.
        kv_write_chunks: chunks whose K/V this forward must persist in the cache
            (the clean re-forward chunk, or the prefix chunks).
        distill_nearly_clean_chunk: reference flag (first denoising chunk t >
            distill_nearly_clean_chunk_threshold) for distilled models.
        distill_interval: shortcut step-size multiplier for the distill dt embedding.
        emits: chunks that are clean after this step's Euler update, in order.
        is_prefix_extraction: the V2V prefix KV extraction forward (no integration).
        kv_keep_from: smallest global chunk index any later plan may read from the
            cache; K/V of older chunks may be released.
    """

    global_step: int
    stagger_index: int
    denoise_idx: int
    slots: tuple[ChunkSlot, ...]
    slice_point: int
    kv_write_chunks: tuple[int, ...]
    distill_nearly_clean_chunk: bool
    distill_interval: float
    emits: tuple[int, ...]
    is_prefix_extraction: bool = False
    kv_keep_from: int = 0

    @property
    def denoise_slots(self) -> tuple[ChunkSlot, ...]:
        return tuple(s for s in self.slots if s.role is SlotRole.DENOISE)

    @property
    def fwd_extra_1st_chunk(self) -> bool:
        """Reference kwarg: the first slot is a clean re-forward."""
        return bool(self.slots) and self.slots[0].role is SlotRole.CLEAN_REFORWARD


@dataclass(frozen=True)
class StepResult:
    """What the runner reports back after executing a :class:`StepPlan`."""

    global_step: int
    emitted: tuple[int, ...]
