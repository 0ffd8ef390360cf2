"""DiT state_dict layout vs the reference manifests, strict loading, tiny checkpoint writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.config import magi_tiny
from stages.dit.model import MagiDiT
from stages.dit.weights import CheckpointMismatch, INDEX_NAME, load_dit, write_tiny_checkpoint
from tests.model.dit_fixtures import dit_config_from_reference


@pytest.mark.parametrize("manifest,config", [("dit_manifest_4.5B.json", "4.5B_base"), ("dit_manifest_24B.json", "24B_base")])
def test_meta_model_matches_reference_manifest(manifest, config, golden_dir):
    entry = json.loads((golden_dir / manifest).read_text())["configs"][config]
    cfg = dit_config_from_reference(entry["model_config"])
    with torch.device("meta"):
        model = MagiDiT(cfg)
    got = [(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    want = [(e["key"], e["shape"], e["dtype"]) for e in entry["state_dict"]]
    assert sorted(got) == sorted(want)
    assert len(got) == entry["num_tensors"]
    assert sum(v.numel() for v in model.state_dict().values()) == entry["num_elements"]
    promoted = {k: str(v.dtype) for k, v in model.promote_high_precision().state_dict().items()}
    assert promoted == {e["key"]: e["dtype_after_high_precision_promoter"] for e in entry["state_dict"]}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dit_ckpt")
    write_tiny_checkpoint(magi_tiny().dit, out, seed=3)
    return out


def test_tiny_checkpoint_official_layout_and_deterministic(tiny_ckpt, tmp_path):
    index = json.loads((tiny_ckpt / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    with torch.device("meta"):
        keys = set(MagiDiT(magi_tiny().dit).state_dict())
    assert set(index["weight_map"]) == keys
    for shard in shards:
        assert set(load_file(str(tiny_ckpt / shard))) == {k for k, s in index["weight_map"].items() if s == shard}
    write_tiny_checkpoint(magi_tiny().dit, tmp_path, seed=3)
    for shard in shards:
        a, b = load_file(str(tiny_ckpt / shard)), load_file(str(tmp_path / shard))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_dit_roundtrip_and_outputs_not_degenerate(tiny_ckpt):
    cfg = magi_tiny().dit
    model = load_dit(tiny_ckpt, cfg)
    assert not any(p.is_meta for p in model.parameters())
    state = {}
    index = json.loads((tiny_ckpt / INDEX_NAME).read_text())
    for shard in set(index["weight_map"].values()):
        state.update(load_file(str(tiny_ckpt / shard)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    gains = model.videodit_blocks.layers[0].ada_modulate_layer.proj[0].bias
    assert 0.2 < gains.std().item() < 1.0  # gates ~ +-0.5: not degenerate


def test_load_dit_strict_names_every_bad_key(tiny_ckpt, tmp_path):
    cfg = magi_tiny().dit
    state = {}
    index = json.loads((tiny_ckpt / INDEX_NAME).read_text())
    for shard in set(index["weight_map"].values()):
        state.update(load_file(str(tiny_ckpt / shard)))
    renamed = "videodit_blocks.layers.1.mlp.linear_fc2.weight"
    reshaped = "y_embedder.null_caption_embedding"
    state["videodit_blocks.layers.1.mlp.linear_fc2.weightX"] = state.pop(renamed)
    state[reshaped] = torch.zeros(3, 5)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointMismatch) as err:
        load_dit(bad, cfg)
    msg = str(err.value)
    assert f"missing keys: ['{renamed}']" in msg
    assert "unexpected keys: ['videodit_blocks.layers.1.mlp.linear_fc2.weightX']" in msg
    assert reshaped in msg and "[3, 5]" in msg


def test_load_dit_missing_path_and_missing_shard(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="no DiT checkpoint"):
        load_dit(tmp_path, magi_tiny().dit)
    index = json.loads((tiny_ckpt / INDEX_NAME).read_text())
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dit(tmp_path, magi_tiny().dit)


def test_load_dit_low_precision_keeps_reference_fp32_modules(tiny_ckpt):
    model = load_dit(tiny_ckpt, magi_tiny().dit, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert sd["videodit_blocks.layers.0.mlp.linear_fc1.weight"].dtype == torch.bfloat16
    assert sd["videodit_blocks.layers.0.self_attention.q_layernorm_xattn.weight"].dtype == torch.bfloat16
    for k in ("x_embedder.weight", "videodit_blocks.layers.0.self_attention.k_layernorm.weight",
              "videodit_blocks.final_layernorm.bias", "final_linear.linear.weight", "rope.bands"):
        assert sd[k].dtype == torch.float32, k
