"""Start-up capacity of a DiTEngine replica from the service config (cluster.capacity.replica)."""

from __future__ import annotations

import pytest
import torch

from cluster.capacity import DoesNotFit, FitSettings, check_fits, replica_capacity
from cluster.capacity.gpus import GPUS, cuda_spec, host_spec
from cluster.capacity.replica import detect_device, host_available_bytes
from cluster.config import ConfigError, ServiceConfig
from cluster.units import GiB


def service(model: str, **parallel) -> ServiceConfig:
    engine = parallel.pop("engine", {})
    return ServiceConfig.from_dict({"model": model, "parallel": parallel, "engine": engine})


def test_fitting_replica_sizes_the_engine_from_the_plan():
    cfg = service("magi-24B-distill-fp8", cp_size=4, pp_size=2, gpu="rtx-4090", engine={"max_active_jobs": 4})
    cap = replica_capacity(cfg, cfg.load_model())
    plan = cap.plan
    assert plan.fits and plan.gpu == GPUS["rtx-4090"] and plan.num_gpus == 8
    assert (plan.height, plan.width) == (720, 1280)  # the model's default size: the engine's block
    assert cap.max_active_jobs == plan.max_concurrent_jobs == plan.jobs_per_forward >= 1
    assert cap.kv_pool_blocks == cap.max_active_jobs * plan.kv.blocks_per_job == plan.kv_pool_blocks
    assert cap.engine_kwargs() == {"max_active_jobs": cap.max_active_jobs, "kv_pool_blocks": cap.kv_pool_blocks,
                                   "batch_cfg": True, "max_forward_tokens": None}  # the engine's defaults
    assert plan.settings.prefix_forward_chunks == 192 // 4 // 6  # limits.max_prefix_frames in whole chunks
    same = check_fits(cfg.load_model(), "rtx-4090", FitSettings(cp_size=4, pp_size=2, max_active_jobs=4,
                                                                prefix_forward_chunks=8))
    assert same.max_concurrent_jobs == cap.max_active_jobs and same.kv_pool_bytes == plan.kv_pool_bytes


def test_admission_is_the_smaller_of_the_cap_and_the_pool():
    model = "magi-24B-distill"
    roomy = replica_capacity(service(model, cp_size=8, gpu="h200", engine={"max_active_jobs": 64}),
                             ServiceConfig(model=model).load_model())
    assert 1 < roomy.max_active_jobs < 64  # the pool (and one forward's activations) bound it
    capped = replica_capacity(service(model, cp_size=8, gpu="h200", engine={"max_active_jobs": 1}),
                              ServiceConfig(model=model).load_model())
    assert capped.max_active_jobs == 1 and capped.kv_pool_blocks == capped.plan.kv.blocks_per_job


def test_24b_on_one_4090_refuses_to_start_and_names_what_to_change():
    cfg = service("magi-24B-base", gpu="rtx-4090")
    with pytest.raises(DoesNotFit) as err:
        replica_capacity(cfg, cfg.load_model())
    msg, plan = str(err.value), err.value.plan
    assert msg.startswith("DiTEngine replica cannot start: magi-24B-base on 1 x NVIDIA GeForce RTX 4090")
    assert f"short by {plan.shortfall_bytes / GiB:.1f} GiB per GPU" in msg and plan.shortfall_bytes > 40 * GiB
    for change in ("cp_size 2", "pp_size 2", "fp8 weights", "resolution", "smallest layout",
                   "parallel.cp_size", "parallel.pp_size", "parallel.plan_height",
                   "engine.batch_cfg false", "engine.max_forward_tokens 108000 (one 5-chunk window per forward)"):
        assert change in msg
    assert "batch_cfg false ->" not in msg.replace("engine.batch_cfg false", "")  # only the real setting key
    assert any(p.fits for label, p in err.value.options if label.startswith("smallest layout"))


def test_plan_resolution_and_dtype_are_planned():
    model = ServiceConfig(model="magi-4.5B-base").load_model()
    with pytest.raises(DoesNotFit):  # 720x720 on one 4090 (see configs/profiles/4.5B-1x4090.yaml)
        replica_capacity(service("magi-4.5B-base", gpu="rtx-4090"), model)
    cap = replica_capacity(service("magi-4.5B-base", gpu="rtx-4090", plan_height=384, plan_width=384), model)
    assert (cap.plan.height, cap.plan.width) == (384, 384) and cap.max_active_jobs == 1
    assert cap.kv_pool_blocks == 4  # 14 chunks of 384x384 in blocks of one 720x720 chunk
    bf16 = replica_capacity(service("magi-4.5B-base", gpu="h200"), model, dtype="bfloat16")
    fp32 = replica_capacity(service("magi-4.5B-base", gpu="h200"), model, dtype="float32")
    assert fp32.plan.kv.block_bytes == 2 * bf16.plan.kv.block_bytes
    assert fp32.plan.weights_bytes > bf16.plan.weights_bytes


def test_cpu_replica_plans_against_host_memory():
    cfg = service("magi-tiny", gpu="cpu", cp_size=2, engine={"max_active_jobs": 3})
    cap = replica_capacity(cfg, cfg.load_model(), dtype="float32")
    dev = cap.plan.gpu
    assert dev.kind == "cpu" and dev.supports_fp8  # fp8 checkpoints run through the dequantizing twin
    assert 0 < dev.memory_bytes <= host_available_bytes() // 2 * 1.05  # two ranks share the host
    assert cap.plan.settings.attention == "sdpa" and "CUDA context" not in dict(cap.plan.overhead_terms)
    assert cap.max_active_jobs == 3 and cap.kv_pool_blocks == 3 * cap.plan.kv.blocks_per_job
    assert "per rank (host memory)" in cap.plan.explain()


def test_auto_device_is_cuda_when_present_else_host_memory():
    dev = detect_device("auto")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        assert dev.kind == "cuda" and props.name in dev.device_names
    else:
        assert dev.kind == "cpu" and dev.name == "cpu"


def test_device_specs_from_what_torch_reports():
    assert cuda_spec("NVIDIA GeForce RTX 4090", 25_000_000_000, (8, 9)) is GPUS["rtx-4090"]
    odd = cuda_spec("NVIDIA L40S", 47_000_000_000, (8, 9))
    assert odd.memory_bytes == 47_000_000_000 and odd.supports_fp8 and odd.kind == "cuda"
    assert host_spec(8 * GiB, 4).memory_bytes == 2 * GiB


def test_fractional_gpu_share_plans_with_that_share():
    model = ServiceConfig(model="magi-4.5B-distill").load_model()
    whole = replica_capacity(service("magi-4.5B-distill", gpu="h200"), model)
    data = {"model": "magi-4.5B-distill", "parallel": {"gpu": "h200"},
            "deployments": {"dit_engine": {"num_gpus": 0.5}}}
    half = replica_capacity(ServiceConfig.from_dict(data), model)
    assert half.plan.memory_bytes == GPUS["h200"].memory_bytes // 2
    assert half.plan.free_bytes < whole.plan.free_bytes


@pytest.mark.parametrize("parallel,key", [
    ({"gpu": "v100"}, "parallel.gpu"),
    ({"kv_pool_fraction": 0}, "parallel.kv_pool_fraction"),
    ({"plan_height": -16}, "parallel.plan_height"),
])
def test_bad_parallel_settings_name_the_key(parallel, key):
    with pytest.raises(ConfigError, match=key):
        ServiceConfig.from_dict({"parallel": parallel})


@pytest.mark.parametrize("parallel,key", [
    ({"cp_size": 3, "gpu": "h200"}, "parallel.cp_size"),  # 24 heads, 8 groups
    ({"pp_size": 4, "gpu": "h200"}, "parallel.pp_size"),  # 34 layers
    ({"plan_height": 500, "gpu": "h200"}, "parallel.plan_height"),
])
def test_layouts_the_model_cannot_split_name_the_key(parallel, key):
    cfg = service("magi-4.5B-base", **parallel)
    with pytest.raises(ConfigError, match=key):
        replica_capacity(cfg, cfg.load_model())


H100_8 = dict(cp_size=8, gpu="h100-80gb-sxm", plan_height=720, plan_width=1280)  # configs/profiles/24B-8xH100.yaml
WINDOW_24B = 5 * 6 * (720 // 16) * (1280 // 16)  # one 5-chunk window at 720x1280: 108000 tokens


def test_bounded_forward_admits_more_jobs_on_8xh100():
    """24B on 8 x H100 at 720x1280: one forward over every job makes activations grow with the
    jobs (1 admitted); engine.max_forward_tokens of one window bounds them, and the KV pool
    alone limits the jobs."""
    model = ServiceConfig(model="magi-24B-base").load_model()
    engine = {"max_active_jobs": 16}
    one = replica_capacity(service("magi-24B-base", **H100_8, engine=engine), model)
    bounded = replica_capacity(service("magi-24B-base", **H100_8, engine={**engine, "max_forward_tokens": WINDOW_24B}),
                               model)
    assert one.max_active_jobs == 1 and bounded.max_active_jobs >= 3
    plan = bounded.plan
    # the largest forward: the longest V2V prefix (192 frames = 8 chunks) in one window, not 3 jobs x 14 chunks
    assert plan.shape.chunks_per_forward == 8 < 3 * plan.shape.chunks_per_job
    assert plan.activation_bytes < one.plan.activation_bytes
    # the pool bounds admission: one more job's KV region does not fit the budget
    assert (bounded.max_active_jobs + 1) * plan.gpu_bytes_per_job > plan.kv_pool_budget_bytes
    assert bounded.engine_kwargs()["max_forward_tokens"] == WINDOW_24B
    assert bounded.kv_pool_blocks == bounded.max_active_jobs * 14
    assert "forwards: batch_cfg true, max_forward_tokens 108000;" in plan.explain()


def test_per_branch_forwards_are_planned():
    model = ServiceConfig(model="magi-24B-base").load_model()
    seq = replica_capacity(service("magi-24B-base", **H100_8, engine={"batch_cfg": False}), model)
    assert seq.engine_kwargs()["batch_cfg"] is False and seq.max_active_jobs == 2
    assert seq.plan.shape.chunks_per_forward == 2 * 8  # two V2V jobs' prefix windows in the same step


@pytest.mark.parametrize("engine,key", [
    ({"max_forward_tokens": 0}, "engine.max_forward_tokens"),
    ({"batch_cfg": "sometimes"}, "engine.batch_cfg"),
])
def test_bad_engine_forward_settings_name_the_key(engine, key):
    with pytest.raises(ConfigError, match=key):
        ServiceConfig.from_dict({"engine": engine})
