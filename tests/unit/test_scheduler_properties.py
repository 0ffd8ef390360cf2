"""Property tests of ChunkScheduler over random (num_chunks, window_size, num_steps, ...)."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.scheduler.chunk_scheduler import ChunkScheduler
from cluster.scheduler.plan import SlotRole, StepPlan, StepResult


@st.composite
def configs(draw):
    window = draw(st.integers(1, 5))
    per = draw(st.integers(1, 4))
    steps = window * per
    divisors = [d for d in (1, 2, 3, 4) if steps % d == 0]
    n_ranges = draw(st.sampled_from(divisors))
    kvrange = tuple(draw(st.lists(st.integers(1, 6), min_size=n_ranges, max_size=n_ranges)))
    if draw(st.booleans()):
        kvrange = (5, 4, 3, 2) if steps % 4 == 0 else kvrange
    offset = draw(st.integers(0, 3))
    return dict(
        num_chunks=offset + draw(st.integers(1, 9)), window_size=window, num_steps=steps, chunk_offset=offset,
        t_schedule=[(k / steps) ** 2 for k in range(steps + 1)], distill_intervals=[1.0] * steps,
        noise2clean_kvrange=kvrange, clean_chunk_kvrange=draw(st.sampled_from([1, 2, -1])),
    )


def _run(sched: ChunkScheduler, limit: int | None = None) -> list[StepPlan]:
    plans = []
    while (limit is None or len(plans) < limit) and (plan := sched.next_plan()) is not None:
        plans.append(plan)
        sched.update(StepResult(plan.global_step, plan.emits))
    return plans


def _cache_reads(plan: StepPlan) -> set[int]:
    return {c for s in plan.slots for c in range(*s.kv_range) if c < plan.slice_point}


@settings(max_examples=150, deadline=None)
@given(configs())
def test_each_chunk_emitted_once_in_order_after_num_steps_integrations(cfg):
    sched = ChunkScheduler(**cfg)
    plans = _run(sched)
    steps, offset, total = cfg["num_steps"], cfg["chunk_offset"], cfg["num_chunks"]
    per = steps // cfg["window_size"]
    denoise_plans = [p for p in plans if not p.is_prefix_extraction]
    assert len(denoise_plans) == per * (total + cfg["window_size"] - 1 - offset) == sched.total_forwards
    assert [p.global_step for p in denoise_plans] == list(range(len(denoise_plans)))
    assert len(plans) - len(denoise_plans) == (1 if offset else 0)
    emitted = [c for p in plans for c in p.emits]
    assert emitted == list(range(offset, total)) == list(sched.emitted)
    integrated = defaultdict(list)
    for p in denoise_plans:
        for s in p.denoise_slots:
            assert s.t == cfg["t_schedule"][s.step_index] and s.t_next == cfg["t_schedule"][s.step_index + 1]
            integrated[s.chunk].append(s.step_index)
        for c in p.emits:  # emitted right after its last integration, and never touched again
            assert integrated[c] == list(range(steps))
    assert sorted(integrated) == list(range(offset, total))
    assert sched.done and sched.next_plan() is None


@settings(max_examples=150, deadline=None)
@given(configs())
def test_kv_keep_from_bounds_every_later_read(cfg):
    plans = _run(ChunkScheduler(**cfg))
    written: set[int] = set()
    emitted: set[int] = set()
    for a, p in enumerate(plans):
        reads = _cache_reads(p)
        assert reads <= written, f"plan {a} reads K/V never written: {sorted(reads - written)}"
        for q in plans[a:]:
            assert min(_cache_reads(q), default=q.slice_point) >= p.kv_keep_from
        if a:
            assert p.kv_keep_from >= plans[a - 1].kv_keep_from  # the ring only moves forward
        assert p.kv_keep_from <= p.slice_point
        for s in p.slots:
            if s.role is SlotRole.CLEAN_REFORWARD:
                assert s.chunk in emitted and s.chunk == p.slice_point and p.kv_write_chunks == (s.chunk,)
        written.update(p.kv_write_chunks)
        emitted.update(p.emits)


@settings(max_examples=100, deadline=None)
@given(configs())
def test_endless_stream_plans_equal_finite_plans_until_the_end(cfg):
    finite = _run(ChunkScheduler(**cfg))
    endless_sched = ChunkScheduler(**{**cfg, "num_chunks": None})
    endless = _run(endless_sched, limit=len(finite) + 3 * cfg["num_steps"])
    assert endless_sched.total_forwards is None and not endless_sched.done
    last = cfg["num_chunks"] - 1
    for f, e in zip(finite, endless):
        if max(s.chunk for s in e.slots) <= last:  # window has not reached past the last chunk
            assert f == e
        else:
            assert f.global_step == e.global_step and f.slots != e.slots
    # the stream keeps emitting chunk after chunk
    assert [c for p in endless for c in p.emits][: last + 1 - cfg["chunk_offset"]] == list(
        range(cfg["chunk_offset"], last + 1))


def test_endless_stream_memory_is_bounded():
    """slice_point - kv_keep_from (chunks the KV ring holds below the window) stays constant."""
    steps = 16
    sched = ChunkScheduler(num_chunks=None, window_size=4, num_steps=steps, chunk_offset=2,
                           t_schedule=[k / steps for k in range(steps + 1)], distill_intervals=[1.0] * steps)
    plans = _run(sched, limit=4 * 500)
    held = {p.slice_point - p.kv_keep_from for p in plans[200:]}
    assert max(held) <= 4  # max(noise2clean_kvrange) - 1
    assert sched.emitted == tuple(range(2, 2 + len(sched.emitted))) and len(sched.emitted) > 490
    sched.cancel()
    assert sched.next_plan() is None and sched.done
