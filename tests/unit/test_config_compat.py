"""The reference config.json compat reader and the official-model presets.

Fixtures: ``tests/data/reference_configs/*.json``, verbatim copies of the reference's shipped
example configs (see the README there).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from stages.config import PRESETS, SpecialTokensConfig, TextEncoderConfig, VaeConfig, load_preset, magi_tiny
from stages.config_compat import ReferenceConfigError, default_name, model_config_from_reference, read_reference_config

DATA = Path(__file__).resolve().parents[1] / "data" / "reference_configs"
FILES = {
    "4.5B_base_config.json": "magi-4.5B-base",
    "4.5B_distill_config.json": "magi-4.5B-distill",
    "4.5B_distill_quant_config.json": "magi-4.5B-distill-fp8",
    "24B_base_config.json": "magi-24B-base",
    "24B_distill_config.json": "magi-24B-distill",
    "24B_distill_quant_config.json": "magi-24B-distill-fp8",
}


def _raw(name: str = "4.5B_base_config.json") -> dict:
    return json.loads((DATA / name).read_text())


@pytest.mark.parametrize("file,preset", list(FILES.items()))
def test_presets_equal_the_shipped_reference_configs(file, preset):
    ref = read_reference_config(DATA / file)
    cfg = load_preset(preset)
    assert ref.model.dit == cfg.dit and ref.model.sampling == cfg.sampling
    assert ref.model == cfg  # name, geometry, VAE, T5, special tokens too
    raw = _raw(file)
    assert cfg.dit.fp8_quant == raw["engine_config"]["fp8_quant"]
    assert cfg.sampling.distill == raw["engine_config"]["distill"]
    assert cfg.sampling.num_steps == raw["runtime_config"]["num_steps"]
    assert (cfg.height, cfg.width) == (raw["runtime_config"]["video_size_h"], raw["runtime_config"]["video_size_w"])
    assert cfg.dit.params_dtype == "bfloat16"
    assert ref.seed == 1234 and ref.num_frames == 96
    assert ref.checkpoints["dit"] == raw["runtime_config"]["load"]
    assert ref.deployment["cp_size"] == raw["engine_config"]["cp_size"]
    assert set(ref.deployment) == {"distributed_backend", "distributed_timeout_minutes", "pp_size", "cp_size",
                                   "cp_strategy", "ulysses_overlap_degree", "kv_offload", "enable_cuda_graph"}


def test_real_model_parts_and_run_sh_special_tokens():
    cfg = load_preset("magi-24B-distill-fp8")
    assert cfg.vae == VaeConfig() and (cfg.vae.embed_dim, cfg.vae.depth, cfg.vae.z_chans) == (1024, 24, 16)
    t5 = cfg.text_encoder
    assert t5 == TextEncoderConfig()
    assert (t5.d_model, t5.num_layers, t5.num_heads, t5.d_kv, t5.d_ff, t5.vocab_size) == (4096, 24, 64, 64, 10240, 32128)
    assert cfg.special_tokens == SpecialTokensConfig(hq=True, duration=True)
    assert cfg.dit.gated_linear_unit and cfg.dit.half_channel_vae and cfg.dit.x_rescale_factor == 0.1
    assert not magi_tiny().special_tokens.enabled  # the tiny preset is unchanged
    assert {"magi-tiny", *FILES.values()} <= set(PRESETS)


def test_unknown_keys_and_sections_are_errors_naming_them():
    raw = _raw()
    raw["runtime_config"]["num_stepz"] = 8
    raw["engine_config"]["fp4_quant"] = True
    raw["model_config"]["use_moe"] = False
    raw["extra"] = {}
    with pytest.raises(ReferenceConfigError) as err:
        read_reference_config(raw)
    assert set(err.value.problems) == {
        "unknown section 'extra'", "unknown key runtime_config.num_stepz", "unknown key engine_config.fp4_quant",
        "unknown key model_config.use_moe"}
    assert "runtime_config.num_stepz" in str(err.value)


def test_missing_keys_and_sections_are_named():
    raw = _raw()
    del raw["runtime_config"]["clean_t"]
    del raw["engine_config"]
    with pytest.raises(ReferenceConfigError) as err:
        read_reference_config(raw)
    assert set(err.value.problems) == {"missing key runtime_config.clean_t", "missing section 'engine_config'"}


def test_reference_post_validation_and_bad_values():
    raw = _raw("4.5B_distill_config.json")
    raw["runtime_config"]["cfg_number"] = 3
    with pytest.raises(ReferenceConfigError, match="runtime_config.cfg_number must be 1"):
        read_reference_config(raw)
    raw = _raw()
    raw["model_config"]["params_dtype"] = "torch.int8"
    with pytest.raises(ReferenceConfigError, match="model_config.params_dtype"):
        read_reference_config(raw)
    raw = _raw()
    raw["model_config"]["num_layers"] = "many"
    with pytest.raises(ReferenceConfigError, match="model_config.num_layers"):
        read_reference_config(raw)
    raw = _raw()
    raw["runtime_config"]["num_steps"] = 10  # not a multiple of window_size 4
    with pytest.raises(ReferenceConfigError, match="num_steps must be a multiple of window_size"):
        read_reference_config(raw)


def test_names_overrides_and_dict_input(tmp_path):
    assert default_name("24B_distill_quant_config") == "magi-24B-distill-fp8"
    assert default_name("my_run") == "reference-my_run"
    raw = _raw("24B_base_config.json")
    assert read_reference_config(raw).model.name == "reference"
    custom = copy.deepcopy(raw)
    custom["runtime_config"]["video_size_w"] = 960
    path = tmp_path / "my_run.json"
    path.write_text(json.dumps(custom))
    cfg = model_config_from_reference(path, special_tokens=SpecialTokensConfig())
    assert cfg.name == "reference-my_run" and cfg.width == 960 and not cfg.special_tokens.enabled
    assert cfg.dit == load_preset("magi-24B-base").dit
    tiny_vae = VaeConfig(embed_dim=256, depth=2)
    assert read_reference_config(raw, name="x", vae=tiny_vae).model.vae == tiny_vae
