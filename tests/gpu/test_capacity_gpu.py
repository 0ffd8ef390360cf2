"""replica_capacity on a CUDA device (``gpu`` marker; skipped without CUDA): ``parallel.gpu: auto``
finds the device torch reports, and the engine's pool on it takes the planned bytes."""

from __future__ import annotations

import pytest
import torch

from cluster.capacity import replica_capacity
from cluster.capacity.gpus import GPUS
from cluster.capacity.replica import detect_device
from cluster.config import ServiceConfig
from cluster.engine import Engine
from stages.dit.weights import load_dit, write_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_detects_the_cuda_device():
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    dev = detect_device("auto")
    assert dev.kind == "cuda" and props.name in dev.device_names
    assert tuple(dev.compute_capability) == (props.major, props.minor)
    known = [spec for spec in GPUS.values() if props.name in spec.device_names]
    assert dev.memory_bytes == (known[0].memory_bytes if known else props.total_memory)


def test_engine_pool_on_cuda_takes_the_planned_bytes(tmp_path):
    cfg = ServiceConfig.from_dict({"model": "magi-tiny", "engine": {"max_active_jobs": 2}})
    model = cfg.load_model()
    cap = replica_capacity(cfg, model, dtype="bfloat16")
    assert cap.plan.gpu.kind == "cuda" and cap.plan.settings.attention == "flash"
    write_tiny_checkpoint(model.dit, tmp_path, seed=0)
    dit = load_dit(tmp_path, model.dit, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    engine = Engine(model, dit, device="cuda", **cap.engine_kwargs())
    torch.cuda.synchronize()
    assert engine.pool.nbytes == cap.plan.kv_pool_bytes
    assert abs(torch.cuda.memory_allocated() - before - cap.plan.kv_pool_bytes) < 1 << 20
