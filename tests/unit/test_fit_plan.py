"""Fit planner: the engine's KV pool per rank, monotonicity, admission arithmetic, errors and the
reference README claims."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.capacity import DoesNotFit, FitSettings, GpuSpec, check_fits, get_gpu, plan_fit
from cluster.capacity.gpus import GPUS
from cluster.scheduler.kv_areas import KVAreas, default_job_areas
from cluster.units import GiB
from stages.config import load_preset
from stages.dit.kv_pool import KVPool
from stages.errors import InvalidInput

M24, M45 = load_preset("magi-24B-base"), load_preset("magi-4.5B-base")
PRESETS = ["magi-4.5B-base", "magi-4.5B-distill", "magi-4.5B-distill-fp8",
           "magi-24B-base", "magi-24B-distill", "magi-24B-distill-fp8"]
ONE = dict(jobs_per_forward=1)  # activations of one job per forward (fixed, not solved)


def per_gpu_bytes(plan) -> int:
    """What the model itself needs per GPU for one job (overheads excluded)."""
    return plan.weights_bytes + plan.activation_bytes + plan.gpu_bytes_per_job


@pytest.mark.parametrize("preset,chunks", [("magi-24B-base", 14), ("magi-24B-distill", 6)])
def test_kv_per_job_is_the_engine_region(preset, chunks):
    """cfg_number 3: [ring | window] + text window + uncond = 5 + 5 + 4; distilled: 5 + 1 self_only."""
    model = load_preset(preset)
    plan = plan_fit(model, "h100-80gb-sxm", FitSettings(cp_size=8))
    assert plan.kv.areas == default_job_areas(model.sampling) and plan.kv.areas.total == chunks
    tpc = 6 * (720 // 16) * (1280 // 16)  # chunk_width x patches per frame = the block at the default size
    assert plan.kv.block_tokens == tpc and plan.kv.blocks_per_job == chunks
    assert plan.kv_bytes_per_job == chunks * tpc * 48 * 2 * 1 * 128 * 2  # 48 layers, K+V, 1 group/rank, Dh, bf16
    rank_pool = KVPool(num_layers=48, num_blocks=1, block_tokens=1, num_groups=1, head_dim=128, dtype=torch.bfloat16)
    assert plan.kv.token_bytes == rank_pool.token_bytes  # the engine's own pool, one token


def test_smaller_jobs_take_whole_blocks_of_the_default_chunk():
    plan = plan_fit(M45, "h200", FitSettings(height=384, width=384))
    tpc = 6 * 24 * 24
    assert plan.kv.block_tokens == 6 * 45 * 45 and plan.kv.tokens_per_chunk == tpc
    assert plan.kv.blocks_per_job == -(-14 * tpc // plan.kv.block_tokens) == 4
    assert plan.kv_pool_blocks == plan.max_concurrent_jobs * 4


def test_kv_is_sharded_by_head_group_and_replicated_beyond_it():
    kv = {cp: plan_fit(M24, "h200", FitSettings(cp_size=cp)).kv_bytes_per_job for cp in (1, 2, 4, 8, 16)}
    assert kv[1] == 2 * kv[2] == 4 * kv[4] == 8 * kv[8]
    assert kv[16] == kv[8]  # 8 groups: cp 16 replicates each group on 2 ranks


@pytest.mark.parametrize("preset", PRESETS)
def test_more_cp_means_fewer_bytes_per_gpu(preset):
    model = load_preset(preset)
    plans = [plan_fit(model, "h200", FitSettings(cp_size=cp, **ONE)) for cp in (1, 2, 4, 8)]
    assert len({p.weights_bytes for p in plans}) == 1  # every cp rank holds the full pipeline stage
    for a, b in zip(plans, plans[1:]):
        assert b.activation_bytes < a.activation_bytes
        assert b.kv_bytes_per_job < a.kv_bytes_per_job
        assert per_gpu_bytes(b) < per_gpu_bytes(a)


@pytest.mark.parametrize("preset", ["magi-4.5B-distill", "magi-24B-base"])
def test_more_pp_means_fewer_weight_and_kv_bytes(preset):
    model = load_preset(preset)
    plans = [plan_fit(model, "h200", FitSettings(pp_size=pp)) for pp in (1, 2)]
    assert plans[1].weights_bytes < plans[0].weights_bytes
    assert plans[1].kv_bytes_per_job * 2 == plans[0].kv_bytes_per_job


@settings(max_examples=40, deadline=None)
@given(preset=st.sampled_from(PRESETS), h=st.integers(10, 60), w=st.integers(10, 90), dh=st.integers(1, 20),
       cp=st.sampled_from([1, 2, 4, 8]), solved=st.booleans())
def test_higher_resolution_means_more_activation_and_kv_bytes(preset, h, w, dh, cp, solved):
    model = load_preset(preset)
    extra = {} if solved else ONE
    small = plan_fit(model, "h100-80gb-sxm", FitSettings(height=16 * h, width=16 * w, cp_size=cp, **ONE))
    big = plan_fit(model, "h100-80gb-sxm", FitSettings(height=16 * (h + dh), width=16 * w, cp_size=cp, **ONE))
    assert big.activation_bytes > small.activation_bytes
    assert big.kv_bytes_per_job >= small.kv_bytes_per_job  # whole blocks: equal within one block
    assert big.kv.tokens_per_chunk > small.kv.tokens_per_chunk
    small_s = plan_fit(model, "h100-80gb-sxm", FitSettings(height=16 * h, width=16 * w, cp_size=cp, **extra))
    big_s = plan_fit(model, "h100-80gb-sxm", FitSettings(height=16 * (h + dh), width=16 * w, cp_size=cp, **extra))
    assert big_s.max_concurrent_jobs <= small_s.max_concurrent_jobs


@settings(max_examples=40, deadline=None)
@given(preset=st.sampled_from(PRESETS), gib=st.integers(8, 200), extra=st.integers(1, 100),
       fraction=st.floats(0.1, 1.0), cp=st.sampled_from([1, 2, 4, 8]))
def test_more_memory_means_more_jobs_and_admission_is_exact(preset, gib, extra, fraction, cp):
    model = load_preset(preset)
    s = FitSettings(cp_size=cp, kv_pool_fraction=fraction, height=480, width=848, **ONE)
    small = plan_fit(model, GpuSpec("x", "test GPU", gib * GiB, (9, 0)), s)
    big = plan_fit(model, GpuSpec("x", "test GPU", (gib + extra) * GiB, (9, 0)), s)
    assert big.max_concurrent_jobs >= small.max_concurrent_jobs
    for p in (small, big):  # the budget holds exactly max_concurrent_jobs jobs, not one more
        n, per = p.max_concurrent_jobs, p.gpu_bytes_per_job
        assert n * per <= p.kv_pool_budget_bytes < (n + 1) * per
        assert p.kv_pool_blocks == n * p.kv.blocks_per_job and p.kv_pool_bytes == n * p.kv_bytes_per_job
        assert p.fits == (p.shortfall_bytes == 0)
        assert p.fixed_bytes + p.free_bytes == p.memory_bytes
    roomy = plan_fit(model, GpuSpec("x", "test GPU", 1024 * GiB, (9, 0)), s)
    assert roomy.fits and roomy.max_concurrent_jobs > small.max_concurrent_jobs


@settings(max_examples=25, deadline=None)
@given(preset=st.sampled_from(PRESETS), gib=st.integers(20, 400), cap=st.one_of(st.none(), st.integers(1, 12)))
def test_solved_plan_packs_every_admitted_job_into_one_forward(preset, gib, cap):
    """The engine runs all active jobs in one forward: the solved plan admits j with activations
    for j jobs, and j + 1 jobs in one forward would not fit (unless the cap stopped it)."""
    model, gpu = load_preset(preset), GpuSpec("x", "test GPU", gib * GiB, (9, 0))
    base = FitSettings(cp_size=8, max_active_jobs=cap)
    plan = plan_fit(model, gpu, base)
    j = plan.max_concurrent_jobs
    if j == 0:
        assert plan_fit(model, gpu, base.model_copy(update={"jobs_per_forward": 1})).max_concurrent_jobs == 0
        return
    assert plan.jobs_per_forward == j and (cap is None or j <= cap)
    assert plan.fixed_bytes + j * plan.gpu_bytes_per_job <= plan.memory_bytes
    fixed_j = plan_fit(model, gpu, base.model_copy(update={"jobs_per_forward": j}))
    assert fixed_j.max_concurrent_jobs >= j and fixed_j.activation_bytes == plan.activation_bytes
    if cap is None or j < cap:
        more = plan_fit(model, gpu, base.model_copy(update={"jobs_per_forward": j + 1}))
        assert more.max_concurrent_jobs < j + 1


def test_shortfall_is_the_memory_that_would_admit_one_job():
    plan = plan_fit(M45, "rtx-4090")
    assert not plan.fits and plan.shortfall_bytes > 0
    exact = GpuSpec("x", "test GPU", plan.memory_bytes + plan.shortfall_bytes, (8, 9))
    grown = plan_fit(M45, exact)
    # fragmentation margin scales with memory, so grow until the fixed terms settle
    while not grown.fits:
        exact = GpuSpec("x", "test GPU", exact.memory_bytes + grown.shortfall_bytes, (8, 9))
        grown = plan_fit(M45, exact)
    assert grown.max_concurrent_jobs == 1


def test_impossible_layout_names_gpu_shortfall_and_changes():
    with pytest.raises(DoesNotFit) as err:
        check_fits(M24, "rtx-4090")
    msg, plan = str(err.value), err.value.plan
    assert plan.shortfall_bytes > 40 * GiB
    assert "RTX 4090" in msg and f"short by {plan.shortfall_bytes / GiB:.1f} GiB per GPU" in msg
    for change in ("cp_size 2", "pp_size 2", "fp8 weights", "resolution", "smallest layout"):
        assert change in msg
    fitting = [p for label, p in err.value.options if label.startswith("smallest layout")]
    assert fitting and all(p.fits for p in fitting)


def test_fp8_needs_compute_capability_8_9():
    fp8 = load_preset("magi-24B-distill-fp8")
    assert get_gpu("rtx-4090").supports_fp8 and get_gpu("h100-80gb-sxm").supports_fp8
    assert not get_gpu("a100-80gb").supports_fp8
    plan = plan_fit(fp8, "a100-80gb", FitSettings(cp_size=8))
    assert plan.max_concurrent_jobs > 0 and not plan.fits
    with pytest.raises(DoesNotFit, match="A100.*compute capability 8.0.*bf16 weights.*fits"):
        check_fits(fp8, "a100-80gb", FitSettings(cp_size=8))


@pytest.mark.parametrize("field,settings", [
    ("cp_size", FitSettings(cp_size=3)),  # divides 24 heads but neither divides nor is a multiple of 8 groups
    ("cp_size", FitSettings(cp_size=5)),  # does not divide 24 heads
    ("pp_size", FitSettings(pp_size=4)),  # 34 layers
    ("height", FitSettings(height=500)),
])
def test_invalid_layouts_name_the_field(field, settings):
    with pytest.raises(InvalidInput) as err:
        plan_fit(M45, "h200", settings)
    assert err.value.field == field


def test_unknown_gpu_is_named():
    with pytest.raises(InvalidInput, match="gpu.*'v100'.*rtx-4090"):
        plan_fit(M45, "v100")
    assert set(GPUS) == {"h100-80gb-sxm", "h200", "rtx-4090", "a100-80gb"}


def test_batched_cfg_and_sdpa_cost_memory():
    one = dict(jobs_per_forward=1)
    batched = plan_fit(M45, "h100-80gb-sxm", FitSettings(**one))  # the engine's default: branches in one forward
    sequential = plan_fit(M45, "h100-80gb-sxm", FitSettings(batch_cfg=False, **one))
    assert batched.shape.chunks_per_forward == 2 * 5 + 4 and sequential.shape.chunks_per_forward == 5
    assert batched.activation_bytes > sequential.activation_bytes
    assert batched.kv_bytes_per_job == sequential.kv_bytes_per_job  # the region holds every branch either way
    sdpa = plan_fit(M45, "h100-80gb-sxm", FitSettings(attention="sdpa", **one))
    scores = dict(sdpa.activation_terms)["attention (sdpa, one chunk)"]
    assert scores >= 24 * 12150 * 5 * 12150 * 2  # heads x one chunk's queries x its 5 chunks of keys, bf16
    assert sdpa.activation_bytes > batched.activation_bytes


def test_explain_lists_every_term_and_the_verdict():
    plan = plan_fit(M24, "h100-80gb-sxm", FitSettings(cp_size=8))
    text = plan.explain()
    for name, _ in plan.activation_terms + plan.overhead_terms:
        assert name in text
    assert "weights" in text and "KV per job (14 chunks: 5 history + 5 text + 4 uncond -> 14 blocks)" in text
    assert f"max concurrent jobs: {plan.max_concurrent_jobs}" in text and "FITS" in text
    assert f"KV pool allocated ({plan.kv_pool_blocks} blocks)" in text


def test_long_v2v_prefix_enlarges_the_largest_forward_and_the_region():
    seq = dict(batch_cfg=False, jobs_per_forward=1)
    base = plan_fit(M45, "h200", FitSettings(**seq))
    short = plan_fit(M45, "h200", FitSettings(prefix_chunks=3, **seq))  # fits inside the window forward
    assert (short.activation_bytes, short.kv_bytes_per_job) == (base.activation_bytes, base.kv_bytes_per_job)
    long = plan_fit(M45, "h200", FitSettings(prefix_chunks=8, **seq))  # 192 prefix frames = 48 latent frames
    assert long.shape.chunks_per_forward == 8 and long.activation_bytes > base.activation_bytes
    assert long.kv.areas == KVAreas(history=8, text=5, uncond=4) == default_job_areas(M45.sampling, 8)
    assert long.kv_bytes_per_job == base.kv_bytes_per_job * 17 // 14


H100_PROFILE = FitSettings(cp_size=8, height=720, width=1280)  # configs/profiles/24B-8xH100.yaml without a budget
TPC_24B = 6 * (720 // 16) * (1280 // 16)  # 21600 tokens per chunk at 720x1280


@pytest.mark.parametrize("budget,chunks", [
    (None, 3 * 14),  # one forward: main 5 + text 5 + uncond 4 per job
    (1, 5),  # below one window: every window alone, the largest is 5 chunks
    (5 * TPC_24B, 5), (12 * TPC_24B + TPC_24B - 1, 12),  # windows packed up to floor(budget / tpc) chunks
    (100 * TPC_24B, 3 * 14),  # never more than the whole step
])
def test_token_budget_bounds_the_largest_forward(budget, chunks):
    plan = plan_fit(M24, "h100-80gb-sxm", H100_PROFILE.model_copy(update={"max_forward_tokens": budget,
                                                                          "jobs_per_forward": 3}))
    assert plan.shape.chunks_per_forward == chunks and plan.shape.tokens_per_forward == chunks * TPC_24B
    assert plan.shape.window_chunks == 5 and plan.shape.chunks_per_job == 14


def test_bounded_forward_admits_more_jobs_for_the_24b_8xh100_profile():
    """One forward over every job: activations of j jobs, 1 job admitted at 720x1280. A budget
    of one window: the same activations for any j, so the KV pool alone bounds the jobs."""
    one = plan_fit(M24, "h100-80gb-sxm", H100_PROFILE)
    bounded = plan_fit(M24, "h100-80gb-sxm", H100_PROFILE.model_copy(update={"max_forward_tokens": 5 * TPC_24B}))
    assert one.max_concurrent_jobs == 1 and bounded.max_concurrent_jobs == 3
    assert bounded.shape.chunks_per_forward == 5 and bounded.jobs_per_forward == 3
    fixed_one = plan_fit(M24, "h100-80gb-sxm", bounded.settings.model_copy(update={"jobs_per_forward": 1}))
    assert fixed_one.activation_bytes == bounded.activation_bytes  # activations no longer grow with the jobs
    n, per = bounded.max_concurrent_jobs, bounded.gpu_bytes_per_job
    assert n * per <= bounded.kv_pool_budget_bytes < (n + 1) * per  # the pool is what stops the 4th job


@settings(max_examples=25, deadline=None)
@given(preset=st.sampled_from(PRESETS), gib=st.integers(20, 400), windows=st.integers(1, 6),
       batch_cfg=st.booleans(), prefix=st.sampled_from([0, 8]))
def test_a_budget_never_admits_fewer_jobs_and_is_solved_exactly(preset, gib, windows, batch_cfg, prefix):
    model, gpu = load_preset(preset), GpuSpec("x", "test GPU", gib * GiB, (9, 0))
    base = FitSettings(cp_size=8, batch_cfg=batch_cfg, prefix_forward_chunks=prefix)
    unbounded = plan_fit(model, gpu, base)
    sh = unbounded.shape
    budget = windows * sh.window_chunks * sh.tokens_per_chunk
    plan = plan_fit(model, gpu, base.model_copy(update={"max_forward_tokens": budget}))
    assert plan.max_concurrent_jobs >= unbounded.max_concurrent_jobs
    more_jobs = plan.max_concurrent_jobs > unbounded.max_concurrent_jobs
    assert plan.activation_bytes <= unbounded.activation_bytes or more_jobs
    assert plan.shape.tokens_per_forward <= max(budget, max(sh.window_chunks, prefix) * sh.tokens_per_chunk)
    j = plan.max_concurrent_jobs
    if j >= 1:  # j jobs fit with the activations of j jobs' largest forward; j + 1 would not
        more = plan_fit(model, gpu, plan.settings.model_copy(update={"jobs_per_forward": j + 1}))
        assert more.max_concurrent_jobs < j + 1


def test_does_not_fit_names_the_engine_forward_settings():
    with pytest.raises(DoesNotFit) as err:
        check_fits(M24, "h100-80gb-sxm", FitSettings(cp_size=2))
    msg = str(err.value)
    tried = dict(err.value.options)
    window = "engine.max_forward_tokens 108000 (one 5-chunk window per forward)"
    assert "engine.batch_cfg false (one forward per guidance branch kind) -> " in msg and f"{window} -> " in msg
    assert tried[window].settings.max_forward_tokens == 108000 and tried[window].shape.chunks_per_forward == 5
    assert not tried["engine.batch_cfg false (one forward per guidance branch kind)"].settings.batch_cfg
    distilled = load_preset("magi-24B-distill")  # one window per job, no guidance branches: nothing to offer
    with pytest.raises(DoesNotFit) as err:
        check_fits(distilled, "rtx-4090", FitSettings())
    assert "engine.batch_cfg" not in str(err.value) and "engine.max_forward_tokens" not in str(err.value)
