"""ChunkScheduler against the reference's recorded walks (schedules.json stagger tables, golden_dit traces).

Every field of every forward of every table is compared; field names map as
kv_range_in_chunks -> ChunkSlot.kv_range, yields -> StepPlan.emits,
clean_reforward_chunk -> the CLEAN_REFORWARD slot, model_t -> slot t values.
"""

from __future__ import annotations

import json

import pytest

from cluster.scheduler.chunk_scheduler import ChunkScheduler
from cluster.scheduler.plan import SlotRole, StepPlan, StepResult
from cluster.scheduler.stagger import generate_sequences
from stages.sampling import init_intervals, init_t
from tests.shared_data import MISSING, golden_json, golden_params

_SCHEDULES = golden_json("schedules.json")
TABLE_IDS = list(range(len(_SCHEDULES["stagger_tables"]))) if _SCHEDULES else [MISSING]
SEQUENCE_KEYS = sorted(_SCHEDULES["generate_sequences"]) if _SCHEDULES else [MISSING]
DIT_CASES = golden_params("golden_dit.json", where=lambda c: c["kind"] == "e2e_walk")


@pytest.fixture(scope="module")
def schedules(golden_dir) -> dict:
    return json.loads((golden_dir / "schedules.json").read_text())


@pytest.fixture
def table(schedules, request) -> dict:
    """Stagger table number ``request.param`` (indirect parametrization)."""
    return schedules["stagger_tables"][request.param]

STEP_FIELDS = {
    "global_step", "stage", "denoise_idx", "denoise_step_per_stage", "window_chunks", "chunk_step_index", "chunk_t",
    "chunk_t_after", "clean_reforward_chunk", "model_input_chunks", "model_t", "kv_range_in_chunks", "slice_point",
    "range_num", "denoising_range_num", "fwd_extra_1st_chunk", "distill_nearly_clean_chunk", "distill_interval",
    "kv_cache_touched",
}


def _scheduler(num_chunks, window_size, num_steps, chunk_offset, shortcut_mode="8,16,16", **kw) -> ChunkScheduler:
    return ChunkScheduler(
        num_chunks=num_chunks, window_size=window_size, num_steps=num_steps,
        t_schedule=init_t(num_steps, shortcut_mode).tolist(),
        distill_intervals=init_intervals(num_steps, shortcut_mode), chunk_offset=chunk_offset, **kw,
    )


def _run(sched: ChunkScheduler) -> list[StepPlan]:
    plans = []
    while (plan := sched.next_plan()) is not None:
        plans.append(plan)
        sched.update(StepResult(plan.global_step, plan.emits))
    return plans


def _table_id(i):
    t = _SCHEDULES["stagger_tables"][i] if _SCHEDULES else None
    return MISSING if t is None else f"C{t['chunk_num']}-W{t['window_size']}-N{t['num_steps']}-off{t['chunk_offset']}"


def _table_scheduler(table) -> ChunkScheduler:
    return _scheduler(
        table["chunk_num"], table["window_size"], table["num_steps"], table["chunk_offset"], table["shortcut_mode"],
        noise2clean_kvrange=table["noise2clean_kvrange"], clean_chunk_kvrange=table["clean_chunk_kvrange"],
        clean_t=table["clean_t"],
    )


def _observed(plan: StepPlan, per: int) -> dict:
    """The plan in the stagger table's vocabulary."""
    den = plan.denoise_slots
    clean = [s.chunk for s in plan.slots if s.role is SlotRole.CLEAN_REFORWARD]
    return {
        "global_step": plan.global_step,
        "stage": plan.stagger_index,
        "denoise_idx": plan.denoise_idx,
        "denoise_step_per_stage": per,
        "window_chunks": [s.chunk for s in den],
        "chunk_step_index": {str(s.chunk): s.step_index for s in den},
        "chunk_t": {str(s.chunk): s.t for s in den},
        "chunk_t_after": {str(s.chunk): s.t_next for s in den},
        "clean_reforward_chunk": clean[0] if clean else None,
        "model_input_chunks": [s.chunk for s in plan.slots],
        "model_t": [s.t for s in plan.slots],
        "kv_range_in_chunks": [list(s.kv_range) for s in plan.slots],
        "slice_point": plan.slice_point,
        "range_num": plan.slice_point + len(plan.slots),
        "denoising_range_num": len(plan.slots),
        "fwd_extra_1st_chunk": plan.fwd_extra_1st_chunk,
        "distill_nearly_clean_chunk": plan.distill_nearly_clean_chunk,
        "distill_interval": plan.distill_interval,
        "kv_cache_touched": plan.fwd_extra_1st_chunk or plan.slice_point > 0,
    }


@pytest.mark.parametrize("table", TABLE_IDS, ids=_table_id, indirect=True)
def test_every_field_of_every_forward_matches_stagger_table(table):
    sched = _table_scheduler(table)
    assert sched.spec.t_schedule == tuple(table["t_schedule"])
    assert sched.total_forwards == table["total_forward_steps"]
    plans = _run(sched)
    denoise = [p for p in plans if not p.is_prefix_extraction]
    assert len(denoise) == len(table["steps"]) == table["total_forward_steps"]
    per = table["num_steps"] // table["window_size"]
    for plan, ref in zip(denoise, table["steps"]):
        assert set(ref) == STEP_FIELDS  # a new golden field must be mapped here
        assert _observed(plan, per) == ref, f"global_step {ref['global_step']}"
        # the clean re-forward chunk is the one whose K/V is written
        assert plan.kv_write_chunks == ((ref["clean_reforward_chunk"],) if ref["fwd_extra_1st_chunk"] else ())


@pytest.mark.parametrize("table", TABLE_IDS, ids=_table_id, indirect=True)
def test_emits_match_yields(table):
    plans = [p for p in _run(_table_scheduler(table)) if not p.is_prefix_extraction]
    emitted = [(c, p.global_step) for p in plans for c in p.emits]
    expected = [(y["chunk_index"], y["yielded_after_integrating_global_step"]) for y in table["yields"]]
    assert emitted == expected
    for y in table["yields"]:
        assert y["chunk_index"] - table["chunk_offset"] == y["chunk_index_relative_to_offset"]


@pytest.mark.parametrize("table", TABLE_IDS, ids=_table_id, indirect=True)
def test_prefix_extraction_plan_matches_table(table):
    plans = _run(_table_scheduler(table))
    ref = table["prefix_video_feature_forward"]
    prefix = [p for p in plans if p.is_prefix_extraction]
    if ref is None:
        assert table["chunk_offset"] == 0 and prefix == []
        return
    assert plans[0] is prefix[0] and len(prefix) == 1  # extracted once, before the first denoising forward
    plan = prefix[0]
    kw = ref["kw"]
    assert [s.t for s in plan.slots] == ref["t"]
    assert [list(s.kv_range) for s in plan.slots] == ref["kv_range_in_chunks"]
    assert all(s.role is SlotRole.PREFIX and s.step_index is None for s in plan.slots)
    assert (plan.slice_point, plan.slice_point + len(plan.slots), len(plan.slots)) == (
        kw["slice_point"], kw["range_num"], kw["denoising_range_num"])
    assert plan.fwd_extra_1st_chunk is kw["fwd_extra_1st_chunk"] is False
    assert plan.distill_interval == kw["distill_interval"]
    assert plan.kv_write_chunks == tuple(range(table["chunk_offset"]))
    assert (plan.global_step, plan.emits, plan.distill_nearly_clean_chunk) == (0, (), False)


@pytest.mark.parametrize("key", SEQUENCE_KEYS)
def test_generate_sequences_raw_outputs(key, schedules):
    args = dict(kv.split("=") for kv in key.split(","))
    c, w, o = int(args["chunk_num"]), int(args["window_size"]), int(args["chunk_offset"])
    ref = schedules["generate_sequences"][key]
    got = generate_sequences(c, w, o)
    assert list(got) == [ref["clip_start"], ref["clip_end"], ref["t_start"], ref["t_end"]]
    # the scheduler's per-stage windows are the same clip ranges
    spec = _scheduler(c, w, 8 * w, o).spec
    assert [spec.window(s) for s in range(len(ref["clip_start"]))] == list(zip(ref["clip_start"], ref["clip_end"]))


def _trace_scheduler(case) -> ChunkScheduler:
    return _scheduler(
        case["chunk_num"], case["window_size"], case["num_steps"], case["prefix_frames"] // case["chunk_width"],
        case["shortcut_mode"], noise2clean_kvrange=case["noise2clean_kvrange"],
        clean_chunk_kvrange=case["clean_chunk_kvrange"], clean_t=case["clean_t"],
        distill_nearly_clean_chunk_threshold=case["distill_nearly_clean_chunk_threshold"],
    )


@pytest.mark.parametrize("name", DIT_CASES)
def test_forward_trace_of_golden_dit_walks(name, golden_dir):
    """Per forward_dispatcher call of the tiny-model runs: t, KV ranges (tokens), slice/range numbers, flags."""
    case = json.loads((golden_dir / "golden_dit.json").read_text())["cases"][name]
    sched = _trace_scheduler(case)
    assert sched.spec.t_schedule == tuple(case["t_schedule"])
    plans = _run(sched)
    trace = case["forward_trace"]
    assert len(plans) == len(trace)
    tokens = trace[0]["kv_range"][0][1] - trace[0]["kv_range"][0][0]  # first query attends to itself only
    for plan, ref in zip(plans, trace):
        kw = ref["kw"]
        assert plan.global_step == ref["global_step"]
        assert [s.t for s in plan.slots] == ref["t"]
        assert [[a * tokens, b * tokens] for a, b in (s.kv_range for s in plan.slots)] == ref["kv_range"]
        assert ref["x_T"] == len(plan.slots) * case["chunk_width"]
        assert plan.slice_point == kw["slice_point"]
        assert plan.slice_point + len(plan.slots) == kw["range_num"]
        assert len(plan.slots) == kw["denoising_range_num"]
        assert plan.fwd_extra_1st_chunk == kw["fwd_extra_1st_chunk"]
        assert plan.is_prefix_extraction == kw.get("extract_prefix_video_feature", False)
        assert plan.distill_nearly_clean_chunk == kw.get("distill_nearly_clean_chunk", False)
        assert plan.distill_interval == kw["distill_interval"]
    emitted = [c - sched.chunk_offset for p in plans for c in p.emits]
    assert emitted == case["yielded_chunk_indices"]


def test_nearly_clean_flag_uses_float32_threshold_crossing():
    """fp32 t = 0.30000001 > 0.3 counts as nearly clean (first denoising chunk's t)."""
    sched = _scheduler(4, 4, 16, 0)
    flagged = {p.global_step: p.distill_nearly_clean_chunk for p in _run(sched)}
    t = init_t(16).tolist()
    assert t[12] > 0.3 and t[11] < 0.3
    # the oldest chunk of window 4 reaches step 12 at global step 12
    assert flagged[11] is False and flagged[12] is True
