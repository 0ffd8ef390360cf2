"""Golden-data helpers for the DiT / engine tests (reference outputs in ``shared/golden``, see its README).

The golden folder is ``$MAGI_GOLDEN_DIR`` or ``<repo>/../shared/golden``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from stages.config import DiTConfig, ModelConfig, SamplingConfig, TextEncoderConfig, VaeConfig
from cluster.engine import Engine
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, PromptSegment
from stages.dit.window_forward import DiTInput

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(os.environ.get("MAGI_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def golden_available() -> bool:
    return (GOLDEN_DIR / "golden_dit.json").exists()


needs_golden = pytest.mark.skipif(not golden_available(), reason=f"golden data not found at {GOLDEN_DIR}")


def dit_config_from_reference(model_config: dict) -> DiTConfig:
    """Map a reference ``model_config`` dict (``tiny_dit_config.json``) onto :class:`DiTConfig`."""
    fields = set(DiTConfig.model_fields)
    kw = {k: v for k, v in model_config.items() if k in fields}
    kw["params_dtype"] = str(model_config["params_dtype"]).replace("torch.", "")
    return DiTConfig(**kw)


def sampling_config_from_reference(run: dict) -> SamplingConfig:
    """Map a reference run config (``runtime_config`` + ``engine_config``) onto :class:`SamplingConfig`."""
    rt, eng = run["runtime_config"], run["engine_config"]
    return SamplingConfig(
        num_steps=rt["num_steps"],
        window_size=rt["window_size"],
        chunk_width=rt["chunk_width"],
        temporal_downsample_factor=rt["temporal_downsample_factor"],
        fps=rt["fps"],
        cfg_number=rt["cfg_number"],
        cfg_t_range=tuple(rt["cfg_t_range"]),
        prev_chunk_scales=tuple(rt["prev_chunk_scales"]),
        text_scales=tuple(rt["text_scales"]),
        noise2clean_kvrange=tuple(rt["noise2clean_kvrange"]),
        clean_chunk_kvrange=rt["clean_chunk_kvrange"],
        clean_t=rt["clean_t"],
        shortcut_mode=eng["shortcut_mode"],
        distill=eng["distill"],
        distill_nearly_clean_chunk_threshold=eng["distill_nearly_clean_chunk_threshold"],
    )


# ----- single-forward cases -----


def _distill_dt(kwargs: dict, k: int) -> torch.Tensor:
    """Reference ``get_embedding_and_meta`` distill dt (base weights with engine.distill)."""
    if kwargs["num_steps"] == 12:
        factor = 4 / kwargs["distill_interval"] * 2
    else:
        factor = kwargs["num_steps"] / 4 * 2
    return torch.full((k,), factor, dtype=torch.float32)


def sf_case_input(case: str, index: dict, tensors: dict) -> DiTInput:
    """DiTInput of single-forward case ``case`` (one segment, no history, caption_dropout False)."""
    g = lambda n: tensors[f"{case}/{n}"]  # noqa: E731
    k = g("t").shape[1]
    return DiTInput(
        x=g("x")[0],
        t=g("t")[0],
        y=g("y")[:, 0],
        y_mask=g("mask")[:, 0],
        kv_range=g("kv_range"),
        caption_dropout=torch.zeros(k, dtype=torch.bool),
        distill_dt=_distill_dt(index["cases"][case]["kwargs"], k) if "distill" in case else None,
    )


# ----- end-to-end cases -----

E2E_CASES = {
    "e2e_t2v_base_cfg3": "base_cfg3",
    "e2e_t2v_distill_cfg1_ns8": "distill_cfg1_ns8",
    "e2e_t2v_distill_cfg1_ns12": "distill_cfg1_ns12",
    "e2e_t2v_base_cfg3_w4_ns16_5chunks": "base_cfg3_w4",
    "e2e_i2v_base_cfg3": "base_cfg3",
    "e2e_i2v_distill_cfg1_ns8": "distill_cfg1_ns8",
    "e2e_v2v_base_cfg3": "base_cfg3",
    "e2e_t2v_glu_cfg3": "glu_cfg3",
}
ATOL_E2E, RTOL_E2E = 1e-4, 1e-3


def model_config_for_run(run: dict, dit_cfg) -> ModelConfig:
    """ModelConfig of a golden run config (``tiny_dit_config.json`` ``run_configs``)."""
    rt = run["runtime_config"]
    return ModelConfig(
        name="golden-tiny", dit=dit_cfg, vae=VaeConfig(),
        text_encoder=TextEncoderConfig(max_length=dit_cfg.caption_max_length, d_model=dit_cfg.caption_channels),
        sampling=sampling_config_from_reference(run), height=rt["video_size_h"], width=rt["video_size_w"],
    )


def run_case(case: str, golden_index, golden_tensors, golden_models, tiny_configs):
    """Run e2e case ``case`` through the Engine with the reference's noise and per-chunk
    captions injected; returns (JobRun, events, number of steps)."""
    meta = golden_index["cases"][case]
    run = tiny_configs["run_configs"][E2E_CASES[case]]
    dit = golden_models[meta["model_config_name"]]
    g = lambda n: golden_tensors[f"{case}/{n}"]  # noqa: E731
    mc = model_config_for_run(run, dit.cfg)
    prefix = g("prefix_video")[0] if meta["prefix_frames"] else None
    offset = meta["prefix_frames"] // meta["chunk_width"]
    n_out = len(meta["yielded_chunk_indices"])
    y, masks = g("y"), g("y_masks")
    captions = tuple((r, CaptionEmbedding(y[0, offset + r], masks[0, offset + r])) for r in range(n_out))
    spec = JobSpec(
        job_id=case, prompt_segments=(PromptSegment(0, "golden"),), num_chunks=n_out, height=mc.height, width=mc.width,
        seed=meta["seed"], num_steps=meta["num_steps"],
    )
    job = Engine(mc, dit).start(EngineJob(spec=spec, captions=captions, prefix_latent=prefix), noise=g("noise"))
    events, steps = [], 0
    while not job.done:
        events.extend(job.step())
        steps += 1
    return job, events, steps
