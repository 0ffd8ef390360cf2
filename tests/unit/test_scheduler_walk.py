"""Scheduler plans + euler_step replay the reference walk bit for bit.

With the reference's recorded per-forward velocities (golden_dit ``step_NNN/velocity``)
and initial noise, integrating the windows our plans describe must reproduce
the reference's model inputs (``x_in``), every yielded clean chunk and the
final latent exactly: this checks windows, step order, t / t_next, the clean
re-forward drop, prefix padding and emission points together.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cluster.scheduler.chunk_scheduler import ChunkScheduler
from cluster.scheduler.plan import StepResult
from stages.sampling import euler_step, init_intervals, init_t

from tests.shared_data import golden_json, golden_params

_INDEX = golden_json("golden_dit.json") or {"tensors": {}}
# every walk whose per-forward velocities the reference recorded
CASES = golden_params("golden_dit.json", where=lambda c: c["kind"] == "e2e_walk")
CASES = [c for c in CASES if f"{c}/step_000/velocity" in _INDEX["tensors"]] or CASES[:1]


@pytest.fixture(scope="module")
def golden(golden_dir):
    meta = json.loads((golden_dir / "golden_dit.json").read_text())["cases"]
    return meta, load_file(str(golden_dir / "golden_dit.safetensors"))


def _pad_prefix(window, prefix, start_frame):
    """Overwrite leading frames with the prefix latent (reference ``try_pad_prefix_video``)."""
    if prefix is None or prefix.shape[2] <= start_frame:
        return window
    n = min(prefix.shape[2] - start_frame, window.shape[2])
    window = window.clone()
    window[:, :, :n] = prefix[:, :, start_frame:start_frame + n]
    return window


@pytest.mark.parametrize("name", CASES)
def test_replay_reference_walk(golden, name):
    meta, tensors = golden
    case = meta[name]
    cw, steps = case["chunk_width"], case["num_steps"]
    prefix = tensors.get(f"{name}/prefix_video")
    plen = 0 if prefix is None else prefix.shape[2]
    sched = ChunkScheduler(
        num_chunks=case["chunk_num"], window_size=case["window_size"], num_steps=steps,
        t_schedule=init_t(steps, case["shortcut_mode"]).tolist(),
        distill_intervals=init_intervals(steps, case["shortcut_mode"]), chunk_offset=plen // cw,
        noise2clean_kvrange=case["noise2clean_kvrange"], clean_chunk_kvrange=case["clean_chunk_kvrange"],
        clean_t=case["clean_t"], distill_nearly_clean_chunk_threshold=case["distill_nearly_clean_chunk_threshold"],
    )
    x = tensors[f"{name}/noise"].clone()
    emitted = []
    while (plan := sched.next_plan()) is not None:
        if plan.is_prefix_extraction:
            sched.update(StepResult(plan.global_step, ()))
            continue
        first, last = plan.slots[0].chunk, plan.slots[-1].chunk
        window = _pad_prefix(x[:, :, first * cw:(last + 1) * cw], prefix, plan.slice_point * cw)
        key = f"{name}/step_{plan.global_step:03d}"
        if f"{key}/x_in" in tensors:
            assert torch.equal(window, tensors[f"{key}/x_in"]), key
        velocity = tensors[f"{key}/velocity"]
        if plan.fwd_extra_1st_chunk:  # the clean chunk's velocity is discarded
            window, velocity = window[:, :, cw:], velocity[:, :, cw:]
        den = plan.denoise_slots
        window = euler_step(window, velocity, [s.t for s in den], [s.t_next for s in den])
        x[:, :, den[0].chunk * cw:(den[-1].chunk + 1) * cw] = window
        for c in plan.emits:
            start = c * cw if (c == 0 and plen == 1) else max(c * cw, plen)  # reference integrate_velocity
            emitted.append((c - sched.chunk_offset, x[:, :, start:(c + 1) * cw].clone()))
        sched.update(StepResult(plan.global_step, plan.emits))
    assert sched.done and sched.steps_done == sched.total_forwards
    assert [i for i, _ in emitted] == case["yielded_chunk_indices"]
    for i, chunk in emitted:
        assert torch.equal(chunk, tensors[f"{name}/chunk_{i}"]), f"chunk {i}"
    assert torch.equal(x, tensors[f"{name}/final_latent"])
