"""Read a MAGI-1 reference ``config.json`` into our config tree (the compat reader).

A user who already has the reference's configuration file (``model_config`` /
``runtime_config`` / ``engine_config``, reference ``inference/common/config.py``
``MagiConfig.from_json``; shipped examples ``example/4.5B/*_config.json`` and
``example/24B/*_config.json``) points us at it and gets a :class:`ModelConfig`.

Rules (those of the reference, made explicit): every section and every key of the
reference dataclasses must be present (reference ``_check_missing_fields``); a key the
reference does not know is an error (the reference dataclass constructor rejects it);
``cfg_number`` must be 1 for distill / fp8 models and 3 otherwise (reference
``post_validation``). All problems are reported together, each naming its key as
``section.key``.

Mapping: ``model_config`` -> :class:`DiTConfig` (``params_dtype`` "torch.bfloat16" ->
"bfloat16"); ``engine_config.fp8_quant`` -> ``DiTConfig.fp8_quant``; the guidance, KV and
chunk settings of ``runtime_config`` plus ``engine_config.distill*`` /
``shortcut_mode`` -> :class:`SamplingConfig`; ``video_size_h/w`` -> ``height``/``width``;
``scale_factor`` -> ``VaeConfig.scale_factor``. What is not model configuration (seed,
num_frames, checkpoint paths, parallelism / offload settings) is returned beside it in
:class:`ReferenceConfig`. The VAE architecture and T5 are not in the file: VAE =
:class:`VaeConfig` defaults (the reference ViTVAE ddconfig), T5 = t5-v1.1-xxl encoder
(:class:`TextEncoderConfig` defaults). Special tokens are env flags in the reference;
the default is what the shipped ``run.sh`` sets (``PAD_HQ=1 PAD_DURATION=1``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from stages.config import (
    RUN_SH_SPECIAL_TOKENS, DiTConfig, ModelConfig, SamplingConfig, SpecialTokensConfig, TextEncoderConfig, VaeConfig,
)

MODEL_KEYS = (
    "model_name", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "layernorm_epsilon", "apply_layernorm_1p", "x_rescale_factor", "half_channel_vae", "params_dtype",
    "patch_size", "t_patch_size", "in_channels", "out_channels", "cond_hidden_ratio", "caption_channels",
    "caption_max_length", "xattn_cond_hidden_ratio", "cond_gating_ratio", "gated_linear_unit",
)
_SAMPLING_RUNTIME_KEYS = (
    "cfg_number", "cfg_t_range", "prev_chunk_scales", "text_scales", "noise2clean_kvrange", "clean_chunk_kvrange",
    "clean_t", "num_steps", "window_size", "fps", "chunk_width", "temporal_downsample_factor",
)
RUNTIME_KEYS = _SAMPLING_RUNTIME_KEYS + (
    "seed", "num_frames", "video_size_h", "video_size_w", "t5_pretrained", "t5_device", "vae_pretrained",
    "scale_factor", "load",
)
_SAMPLING_ENGINE_KEYS = ("distill_nearly_clean_chunk_threshold", "shortcut_mode", "distill")
_DEPLOY_ENGINE_KEYS = (
    "distributed_backend", "distributed_timeout_minutes", "pp_size", "cp_size", "cp_strategy",
    "ulysses_overlap_degree", "kv_offload", "enable_cuda_graph",
)
ENGINE_KEYS = _DEPLOY_ENGINE_KEYS + ("fp8_quant",) + _SAMPLING_ENGINE_KEYS
SECTIONS = {"model_config": MODEL_KEYS, "runtime_config": RUNTIME_KEYS, "engine_config": ENGINE_KEYS}
_TUPLE_KEYS = ("cfg_t_range", "prev_chunk_scales", "text_scales", "noise2clean_kvrange")
_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}


class ReferenceConfigError(ValueError):
    """The file is not a valid reference config; ``problems`` names every offending key."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"reference config {source}: " + "; ".join(problems))


@dataclass(frozen=True)
class ReferenceConfig:
    """A reference config.json, split into our model configuration and the rest.

    Attributes:
        model: the servable model configuration.
        seed: reference ``runtime_config.seed`` (our requests carry their own seed).
        num_frames: reference ``runtime_config.num_frames`` (video frames of one run).
        checkpoints: ``{"dit": load, "t5": t5_pretrained, "vae": vae_pretrained}`` paths as written.
        t5_device: reference ``runtime_config.t5_device``.
        deployment: the parallelism / offload settings of ``engine_config`` (``cp_size``,
            ``cp_strategy``, ``pp_size``, ``kv_offload`` ...), for the deployment configuration.
    """

    model: ModelConfig
    seed: int
    num_frames: int
    checkpoints: dict[str, str]
    t5_device: str
    deployment: dict[str, Any] = field(default_factory=dict)


def default_name(stem: str) -> str:
    """Preset-style name of a reference file stem: ``4.5B_distill_quant_config`` -> ``magi-4.5B-distill-fp8``;
    any other stem -> ``reference-<stem>``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?B)_(base|distill|distill_quant)_config", stem)
    if not m:
        return f"reference-{stem}"
    return f"magi-{m.group(1)}-{m.group(2).replace('distill_quant', 'distill-fp8')}"


def _check_keys(raw: Mapping[str, Any]) -> list[str]:
    problems = [f"unknown section {k!r}" for k in raw if k not in SECTIONS]
    for section, keys in SECTIONS.items():
        body = raw.get(section)
        if not isinstance(body, Mapping):
            problems.append(f"missing section {section!r}")
            continue
        problems += [f"unknown key {section}.{k}" for k in body if k not in keys]
        problems += [f"missing key {section}.{k}" for k in keys if k not in body]
    return problems


def _dit(model: Mapping[str, Any], fp8_quant: bool) -> DiTConfig:
    kw = {k: v for k, v in model.items() if k != "model_name"}
    dtype = kw["params_dtype"]
    if dtype not in _DTYPES:
        raise ReferenceConfigError("", [f"model_config.params_dtype {dtype!r} not one of {sorted(_DTYPES)}"])
    kw["params_dtype"] = _DTYPES[dtype]
    return DiTConfig(**kw, fp8_quant=fp8_quant)


def _sampling(runtime: Mapping[str, Any], engine: Mapping[str, Any]) -> SamplingConfig:
    kw = {k: runtime[k] for k in _SAMPLING_RUNTIME_KEYS}
    kw.update({k: engine[k] for k in _SAMPLING_ENGINE_KEYS})
    for k in _TUPLE_KEYS:
        kw[k] = tuple(kw[k])
    return SamplingConfig(**kw)


def read_reference_config(
    source: str | Path | Mapping[str, Any],
    *,
    name: str | None = None,
    special_tokens: SpecialTokensConfig = RUN_SH_SPECIAL_TOKENS,
    vae: VaeConfig | None = None,
    text_encoder: TextEncoderConfig | None = None,
) -> ReferenceConfig:
    """Read a reference ``config.json`` (path or already-parsed dict).

    Args:
        source: the file, or its parsed JSON object.
        name: model name; default from the file name (:func:`default_name`), "reference" for a dict.
        special_tokens: special-token settings (the reference's env flags); default ``run.sh``'s.
        vae, text_encoder: override the VAE / T5 configuration (defaults: the real models).

    Returns:
        :class:`ReferenceConfig`.

    Raises:
        ReferenceConfigError: unknown / missing sections or keys, a bad ``params_dtype``,
            ``cfg_number`` inconsistent with distill / fp8_quant, or values our config tree
            rejects (each problem names its key).
        FileNotFoundError / json.JSONDecodeError: unreadable file.
    """
    if isinstance(source, Mapping):
        raw, where, stem = source, "<dict>", None
    else:
        path = Path(source)
        raw, where, stem = json.loads(path.read_text()), str(path), path.stem
    problems = _check_keys(raw)
    if problems:
        raise ReferenceConfigError(where, problems)
    model, runtime, engine = raw["model_config"], raw["runtime_config"], raw["engine_config"]
    wants = 1 if (engine["fp8_quant"] or engine["distill"]) else 3
    if runtime["cfg_number"] != wants:
        raise ReferenceConfigError(where, [
            f"runtime_config.cfg_number must be {wants} for fp8_quant={engine['fp8_quant']}, "
            f"distill={engine['distill']} (reference post_validation), got {runtime['cfg_number']}"])
    base_vae = vae or VaeConfig()
    dit = _build(where, "model_config", lambda: _dit(model, bool(engine["fp8_quant"])))
    sampling = _build(where, "runtime_config", lambda: _sampling(runtime, engine))
    cfg = _build(where, "runtime_config", lambda: ModelConfig(
        name=name or (default_name(stem) if stem else "reference"),
        dit=dit,
        vae=base_vae.model_copy(update={"scale_factor": float(runtime["scale_factor"])}),
        text_encoder=text_encoder or TextEncoderConfig(),
        sampling=sampling,
        height=runtime["video_size_h"],
        width=runtime["video_size_w"],
        special_tokens=special_tokens,
    ))
    return ReferenceConfig(
        model=cfg, seed=int(runtime["seed"]), num_frames=int(runtime["num_frames"]),
        checkpoints={"dit": runtime["load"], "t5": runtime["t5_pretrained"], "vae": runtime["vae_pretrained"]},
        t5_device=str(runtime["t5_device"]), deployment={k: engine[k] for k in _DEPLOY_ENGINE_KEYS},
    )


def _build(where: str, section: str, make):
    """Run ``make()``; turn validation errors into a :class:`ReferenceConfigError` naming ``section.key``."""
    try:
        return make()
    except ValidationError as err:
        problems = [f"{section}.{'.'.join(str(p) for p in e.get('loc', ())) or '<root>'}: {e.get('msg')}"
                    for e in err.errors()]
        raise ReferenceConfigError(where, problems) from None
    except ReferenceConfigError as err:
        raise ReferenceConfigError(where, err.problems) from None


def model_config_from_reference(source: str | Path | Mapping[str, Any], **kwargs) -> ModelConfig:
    """Shortcut: ``read_reference_config(source, **kwargs).model``."""
    return read_reference_config(source, **kwargs).model
