"""Weight bytes of the fit planner: config arithmetic vs the reference manifests vs meta-device models."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch

from stages.config import DiTConfig, TextEncoderConfig, VaeConfig, load_preset, magi_tiny
from stages.parallel.weights import (
    DTYPE_BYTES, dit_layer_counts, dit_pp_stage_counts, dit_shared_counts, dit_weight_bytes, nbytes, pp_stage_layers,
    t5_encoder_params, vae_params,
)
from tests import shared_data

GOLDEN = shared_data.golden_dir()
needs_golden = shared_data.skip_unless(GOLDEN / "dit_manifest_24B.json", "golden manifests")
PRESET_OF = {
    "4.5B_base": "magi-4.5B-base", "4.5B_distill": "magi-4.5B-distill", "4.5B_distill_quant": "magi-4.5B-distill-fp8",
    "24B_base": "magi-24B-base", "24B_distill": "magi-24B-distill", "24B_distill_quant": "magi-24B-distill-fp8",
}
LAYER_KEY = re.compile(r"videodit_blocks\.layers\.(\d+)\.")


def _manifest_entries():
    for size in ("4.5B", "24B"):
        path = GOLDEN / f"dit_manifest_{size}.json"
        if path.exists():
            yield from json.loads(path.read_text())["configs"].items()


def _dit_config(entry: dict) -> DiTConfig:
    fields = set(DiTConfig.model_fields)
    kw = {k: v for k, v in entry["model_config"].items() if k in fields}
    kw["params_dtype"] = kw["params_dtype"].replace("torch.", "")
    return DiTConfig(**kw, fp8_quant=entry["fp8_quant"])


def _count(entries, dtype_key: str) -> Counter:
    out: Counter = Counter()
    for e in entries:
        out[e[dtype_key].replace("torch.", "")] += math.prod(e["shape"])
    return out


MANIFEST = dict(_manifest_entries())


@needs_golden
@pytest.mark.parametrize("name", sorted(PRESET_OF))
def test_arithmetic_equals_manifest_per_layer_and_dtype(name):
    entry = MANIFEST[name]
    cfg = _dit_config(entry)
    assert load_preset(PRESET_OF[name]).dit == cfg  # the presets are the manifest configs
    by_layer: dict[int, list] = {}
    shared = []
    for e in entry["state_dict"]:
        m = LAYER_KEY.match(e["key"])
        (by_layer.setdefault(int(m.group(1)), []) if m else shared).append(e)
    assert sorted(by_layer) == list(range(cfg.num_layers))
    for promoted, key in ((False, "dtype"), (True, "dtype_after_high_precision_promoter")):
        assert dit_shared_counts(cfg, promoted) == _count(shared, key)
        for layer, entries in by_layer.items():
            assert dit_layer_counts(cfg, layer, promoted) == _count(entries, key), (name, layer, promoted)
    total = dit_pp_stage_counts(cfg, range(cfg.num_layers))
    assert sum(total.values()) == entry["num_elements"]
    assert nbytes(total) == sum(
        DTYPE_BYTES[e["dtype_after_high_precision_promoter"].replace("torch.", "")] * math.prod(e["shape"])
        for e in entry["state_dict"]
    )


@needs_golden
def test_fp8_checkpoints_quantize_all_but_first_and_last_layer():
    entry = MANIFEST["24B_distill_quant"]
    cfg = _dit_config(entry)
    fp8_layers = {int(LAYER_KEY.match(e["key"]).group(1)) for e in entry["state_dict"] if "float8" in e["dtype"]}
    assert fp8_layers == set(range(1, cfg.num_layers - 1))
    bf16 = load_preset("magi-24B-distill").dit
    assert 0.5 < dit_weight_bytes(cfg) / dit_weight_bytes(bf16) < 0.6  # 7 of 10 linears at 1 byte instead of 2


def _meta_bytes(module: torch.nn.Module) -> Counter:
    out: Counter = Counter()
    for t in module.state_dict().values():
        out[str(t.dtype).replace("torch.", "")] += t.numel()
    return out


@pytest.mark.parametrize("preset", ["magi-tiny", "magi-4.5B-base", "magi-24B-base", "magi-24B-distill-fp8"])
def test_arithmetic_equals_meta_device_model(preset):
    from stages.dit.model import MagiDiT

    cfg = load_preset(preset).dit
    with torch.device("meta"):
        model = MagiDiT(cfg)
    assert _meta_bytes(model) == dit_pp_stage_counts(cfg, range(cfg.num_layers), promoted=False)
    assert _meta_bytes(model.promote_high_precision()) == dit_pp_stage_counts(cfg, range(cfg.num_layers))


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 6])
def test_pipeline_stages_partition_the_layers(pp):
    cfg = load_preset("magi-24B-distill-fp8").dit
    pp_stages = pp_stage_layers(cfg.num_layers, pp)
    assert [layer for r in pp_stages for layer in r] == list(range(cfg.num_layers))
    per_pp_stage = [nbytes(dit_pp_stage_counts(cfg, r)) for r in pp_stages]
    shared = nbytes(dit_shared_counts(cfg))
    assert sum(per_pp_stage) == dit_weight_bytes(cfg) + (pp - 1) * shared  # embedders on every pipeline stage
    if pp > 2:  # the bf16 first and last layers make the outer pipeline stages the heaviest
        assert per_pp_stage[0] > per_pp_stage[1] and per_pp_stage[-1] > per_pp_stage[1]


@pytest.mark.parametrize("cfg", [TextEncoderConfig(), magi_tiny().text_encoder], ids=["xxl", "tiny"])
def test_t5_params_equal_transformers_model(cfg):
    from transformers import T5EncoderModel

    from stages.text_encoder.checkpoint import t5_config

    with torch.device("meta"):
        model = T5EncoderModel(t5_config(cfg))
    assert t5_encoder_params(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cfg", [VaeConfig(), magi_tiny().vae], ids=["real", "tiny"])
def test_vae_params_equal_meta_model(cfg):
    from stages.vae.model import MagiVAE

    with torch.device("meta"):
        model = MagiVAE(cfg)
    assert vae_params(cfg) == sum(t.numel() for t in model.state_dict().values())


@needs_golden
def test_vae_params_equal_manifest():
    manifest = json.loads((GOLDEN / "vae_manifest.json").read_text())
    assert vae_params(VaeConfig(**manifest["ddconfig"])) == manifest["num_elements"]
