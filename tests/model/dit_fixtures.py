"""Golden-data helpers for the DiT / engine tests (reference outputs in ``../shared/golden``, see
its README). Every setting of a case (shapes, seed, steps, window, chunk width, guidance and KV
settings, thresholds) is read from the case's JSON entry, so a golden set made by the same harness
at other sizes runs unchanged. Not a test module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.engine import Engine
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, PromptSegment
from stages.config import DiTConfig, ModelConfig, SamplingConfig, TextEncoderConfig, VaeConfig
from stages.dit.model import MagiDiT
from stages.dit.packed import DenseKV, PackedWindow
from tests.shared_data import run_config_name  # noqa: F401  (re-exported for the golden tests)

ATOL_SF, RTOL_SF = 1e-5, 1e-4  # single forwards (golden README)
ATOL_E2E, RTOL_E2E = 1e-4, 1e-3  # end-to-end chunks
WEIGHTS = {"base": "tiny_dit.safetensors", "glu": "tiny_dit_glu.safetensors"}  # golden README, "Files"


def dit_config_from_reference(model_config: dict) -> DiTConfig:
    """Map a reference ``model_config`` dict (``tiny_dit_config.json``) onto :class:`DiTConfig`."""
    kw = {k: v for k, v in model_config.items() if k in DiTConfig.model_fields}
    kw["params_dtype"] = str(model_config["params_dtype"]).replace("torch.", "")
    return DiTConfig(**kw)


# ----- which run config and model a case used --------------------------------------


def model_name(model_config: dict, tiny_configs: dict) -> str:
    """The tiny model (``base`` / ``glu``) whose ``model_config`` equals ``model_config``."""
    return next(n for n in WEIGHTS if tiny_configs[n]["model_config"] == model_config)


def sampling_config(run: dict, case: dict | None = None) -> SamplingConfig:
    """SamplingConfig of a run config (``runtime_config`` + ``engine_config``), overridden by the
    e2e ``case``'s own settings where it has them."""
    rt, eng, case = run["runtime_config"], run["engine_config"], case or {}
    pick = lambda k, src: case.get(k, src[k])  # noqa: E731
    return SamplingConfig(
        num_steps=pick("num_steps", rt), window_size=pick("window_size", rt), chunk_width=pick("chunk_width", rt),
        temporal_downsample_factor=rt["temporal_downsample_factor"], fps=rt["fps"], cfg_number=pick("cfg_number", rt),
        cfg_t_range=tuple(pick("cfg_t_range", rt)), prev_chunk_scales=tuple(pick("prev_chunk_scales", rt)),
        text_scales=tuple(pick("text_scales", rt)), noise2clean_kvrange=tuple(pick("noise2clean_kvrange", rt)),
        clean_chunk_kvrange=pick("clean_chunk_kvrange", rt), clean_t=pick("clean_t", rt),
        shortcut_mode=pick("shortcut_mode", eng), distill=pick("distill", eng),
        distill_nearly_clean_chunk_threshold=pick("distill_nearly_clean_chunk_threshold", eng),
    )


def model_config(case: dict, run: dict, dit_cfg: DiTConfig) -> ModelConfig:
    """ModelConfig of e2e ``case``: geometry from its ``latent_size`` (1, C, T, h, w)."""
    factor = ModelConfig.model_fields["vae_spatial_factor"].default
    h, w = case["latent_size"][-2:]
    return ModelConfig(
        name="golden-tiny", dit=dit_cfg, vae=VaeConfig(), sampling=sampling_config(run, case),
        text_encoder=TextEncoderConfig(max_length=dit_cfg.caption_max_length, d_model=dit_cfg.caption_channels),
        height=h * factor, width=w * factor,
    )


# ----- one DiT forward over a window (on the public packed forward) ---------------------


def forward_window(model: MagiDiT, x, t, y, y_mask, kv_range, caption_dropout=None, distill_dt=None) -> torch.Tensor:
    """One reference ``VideoDiTModel.forward`` without history: a window of K chunks.

    Args: x (C, T, H, W) float32 latents; t (K,) timesteps; y (K, L, caption_channels) captions;
        y_mask (K, L); kv_range (K, 2) [start, end) in tokens over the window's keys;
        caption_dropout (K,) bool (default all False); distill_dt (K,) or None.
    Returns: (C_out, T, H, W) float32 velocity.
    """
    cfg, k = model.cfg, int(t.shape[0])
    tpc = model.tokens_per_chunk(x.shape[1] // k, x.shape[2], x.shape[3])
    keys = DenseKV(cfg.num_layers, k * tpc, cfg.num_query_groups, cfg.kv_channels, model.params_dtype, model.device)
    window = PackedWindow(
        x=x, t=t, y=y, y_mask=y_mask, key_ranges=[[(int(a), int(b))] for a, b in kv_range.tolist()],
        caption_dropout=torch.zeros(k, dtype=torch.bool) if caption_dropout is None else caption_dropout,
        kv_dest=[i * tpc for i in range(k)], distill_dt=distill_dt,
    )
    with torch.no_grad():
        return model.forward_packed([window], keys, cross_per_chunk=False)[0]


def forward_with_history(model: MagiDiT, x, t, y, y_mask, kv_range, caption_dropout, segments=None, history=None,
                         return_kv=()) -> tuple[torch.Tensor, dict]:
    """One window over keys = [history | window] (a private :class:`DenseKV`, history copied in).

    Args: as :func:`forward_window`; kv_range indexes [history | window] tokens; segments
        ((num_chunks, rope_frame_offset), ...) or None; history per-layer (k, v), each (Sh, G, Dh);
        return_kv: window chunk indices whose per-layer K/V to return.
    Returns: (velocity (C_out, T, H, W) float32, {chunk: [(k, v) per layer]}).
    """
    cfg, k = model.cfg, int(t.shape[0])
    tpc = model.tokens_per_chunk(x.shape[1] // k, x.shape[2], x.shape[3])
    hist = 0 if not history else int(history[0][0].shape[0])
    buf = DenseKV(cfg.num_layers, hist + k * tpc, cfg.num_query_groups, cfg.kv_channels, model.params_dtype,
                  model.device, history)
    window = PackedWindow(x=x, t=t, y=y, y_mask=y_mask, caption_dropout=caption_dropout,
                          key_ranges=[[(int(a), int(b))] for a, b in kv_range.tolist()],
                          kv_dest=[hist + i * tpc for i in range(k)], segments=segments)
    with torch.no_grad():
        velocity = model.forward_packed([window], buf, cross_per_chunk=False)[0]
    spans = {i: slice(hist + i * tpc, hist + (i + 1) * tpc) for i in return_kv}
    kv = {i: [(kb[sp].clone(), vb[sp].clone()) for kb, vb in (buf.layer(n) for n in range(cfg.num_layers))]
          for i, sp in spans.items()}
    return velocity, kv


def sf_distill_dt(kwargs: dict, k: int) -> torch.Tensor:
    """Reference ``get_embedding_and_meta`` distill dt: num_steps / 4 * 2, or 4 / distill_interval * 2
    for the 12-step shortcut schedule (golden README, "cfg_number = 1")."""
    n = kwargs["num_steps"]
    return torch.full((k,), 4 / kwargs["distill_interval"] * 2 if n == 12 else n / 4 * 2, dtype=torch.float32)


@dataclass
class SfCase:
    """A single-forward case: the model to run and its inputs (see :func:`forward_window`)."""

    model: str
    inputs: dict = field(default_factory=dict)


def sf_case(case: str, index: dict, tensors: dict, tiny_configs: dict) -> SfCase:
    """Model and inputs of single-forward ``case`` (one segment, no history, caption_dropout False)."""
    run = tiny_configs["run_configs"][run_config_name(case, tiny_configs)]
    g = lambda n: tensors[f"{case}/{n}"]  # noqa: E731
    k = g("t").shape[1]
    dt = sf_distill_dt(index["cases"][case]["kwargs"], k) if run["engine_config"]["distill"] else None
    inputs = dict(x=g("x")[0], t=g("t")[0], y=g("y")[:, 0], y_mask=g("mask")[:, 0], kv_range=g("kv_range"), distill_dt=dt)
    return SfCase(model_name(run["model_config"], tiny_configs), inputs)


# ----- end-to-end cases through the engine's multi-job API ------------------------------


@dataclass
class E2ERun:
    """What the engine did for one e2e case: its events, steps and, when recorded, per step the
    packed windows and raw branch velocities of its forwards (``forwards[step]``)."""

    events: list
    steps: int
    forwards: list = field(default_factory=list)

    @property
    def chunks(self) -> list[LatentChunk]:
        return [e for e in self.events if isinstance(e, LatentChunk)]


class ForwardRecorder:
    """Wraps an engine's packed DiT forward and keeps (window, velocity) of every branch window."""

    def __init__(self, engine: Engine):
        self.inner, self.calls = engine.runner.forward_packed, []
        engine.runner.forward_packed = self

    def __call__(self, windows, kv):
        out = self.inner(windows, kv)
        self.calls.extend((w, v.clone()) for w, v in zip(windows, out))
        return out


def job_state(engine: Engine, job_id: str):
    """The engine-side :class:`cluster.engine.prepare.JobState` of a queued or active job (white-box
    tests: its context, scheduler and KV ring)."""
    return engine._admission.get(job_id)


def case_job(case: str, meta: dict, tensors: dict, mc: ModelConfig) -> EngineJob:
    """The engine job of e2e ``case``: the reference's prepared per-chunk captions ``y[0]`` and
    prefix latent; seed and steps from the case."""
    g = lambda n: tensors[f"{case}/{n}"]  # noqa: E731
    offset = meta["prefix_frames"] // meta["chunk_width"]
    n_out = len(meta["yielded_chunk_indices"])
    y, masks = g("y"), g("y_masks")
    captions = tuple((r, CaptionEmbedding(y[0, offset + r], masks[0, offset + r])) for r in range(n_out))
    spec = JobSpec(job_id=case, prompt_segments=(PromptSegment(0, "golden"),), num_chunks=n_out, height=mc.height,
                   width=mc.width, seed=meta["seed"], num_steps=meta["num_steps"])
    return EngineJob(spec=spec, captions=captions, prefix_latent=g("prefix_video")[0] if meta["prefix_frames"] else None)


def run_case(engine: Engine, job: EngineJob, noise: torch.Tensor, record: bool = False) -> E2ERun:
    """Submit ``job`` with the reference's ``noise`` and step the engine until it is idle."""
    recorder = ForwardRecorder(engine) if record else None
    engine.submit(job, noise=noise)
    events, forwards = [], []
    while engine.has_work:
        events.extend(engine.step())
        if recorder is not None and recorder.calls:
            forwards.append(recorder.calls)
            recorder.calls = []
    return E2ERun(events, engine.stats().steps, forwards)
