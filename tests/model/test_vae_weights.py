"""VAE state_dict layout (reference manifest), strict loader and deterministic tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.config import VaeConfig, magi_tiny
from stages.vae import MagiVAE
from stages.vae.weights import (
    CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, init_tiny_weights, load_vae, write_tiny_checkpoint,
)
from tests.model.vae_fixtures import golden_path, golden_vae_config


def test_layout_matches_reference_manifest_at_real_config():
    manifest = json.loads(golden_path("vae_manifest.json").read_text())
    cfg = VaeConfig(**manifest["ddconfig"])
    with torch.device("meta"):
        model = MagiVAE(cfg)
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(e["key"], e["shape"]) for e in manifest["state_dict"]]
    assert ours == theirs
    assert len(ours) == manifest["num_tensors"]
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_elements"]


def test_default_config_is_the_manifest_config():
    manifest = json.loads(golden_path("vae_manifest.json").read_text())
    assert VaeConfig().model_dump(exclude={"scale_factor"}) == manifest["ddconfig"]


def test_tiny_checkpoint_reproduces_golden_weights_bit_for_bit(tmp_path):
    write_tiny_checkpoint(golden_vae_config(), tmp_path, seed=0)
    ours = load_file(str(tmp_path / WEIGHTS_NAME))
    golden = load_file(str(golden_path("tiny_vae.safetensors")))
    assert sorted(ours) == sorted(golden)
    for key, value in golden.items():
        assert torch.equal(ours[key], value), key
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["_class_name"] == "ViTVAE" and config["model_type"] == "vit"


def test_tiny_weights_depend_on_seed_and_leave_global_rng_alone():
    cfg = magi_tiny().vae
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = init_tiny_weights(cfg, seed=0), init_tiny_weights(cfg, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a.decoder.pos_embed, b.decoder.pos_embed)
    assert torch.equal(a.decoder.pos_embed, init_tiny_weights(cfg, seed=0).decoder.pos_embed)


def test_load_folder_and_single_file_give_same_model(tmp_path):
    cfg = golden_vae_config()
    write_tiny_checkpoint(cfg, tmp_path)
    from_dir = load_vae(tmp_path, cfg)
    from_file = load_vae(golden_path("tiny_vae.safetensors"), cfg)
    for (k, a), (_, b) in zip(from_dir.state_dict().items(), from_file.state_dict().items()):
        assert torch.equal(a, b), k
    assert not from_dir.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in from_dir.parameters())


def test_load_dtype(tmp_path):
    write_tiny_checkpoint(magi_tiny().vae, tmp_path)
    model = load_vae(tmp_path, magi_tiny().vae, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model.decode(torch.zeros(1, 16, 2, 2, 2, dtype=torch.bfloat16))
    assert out.shape == (1, 3, 8, 16, 16) and torch.isfinite(out.float()).all()


def test_load_sharded_index(tmp_path):
    cfg = magi_tiny().vae
    state = init_tiny_weights(cfg).state_dict()
    keys = list(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({k: state[k].contiguous() for k in shard_keys}, str(tmp_path / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    model = load_vae(tmp_path, cfg)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_loader_names_missing_unexpected_and_wrong_shape_keys(tmp_path):
    cfg = magi_tiny().vae
    state = dict(init_tiny_weights(cfg).state_dict())
    del state["decoder.norm.bias"]
    state["decoder.extra.weight"] = torch.zeros(2)
    state["encoder.last_layer.bias"] = torch.zeros(31)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError) as err:
        load_vae(path, cfg)
    message = str(err.value)
    assert "decoder.norm.bias" in message and "missing" in message
    assert "decoder.extra.weight" in message and "unexpected" in message
    assert "encoder.last_layer.bias" in message and "(31,)" in message and "(32,)" in message


def test_loader_rejects_config_mismatch(tmp_path):
    write_tiny_checkpoint(magi_tiny().vae, tmp_path)
    other = magi_tiny().vae.model_copy(update={"depth": 3, "scale_factor": 0.5})
    with pytest.raises(ValueError, match="depth.*scale_factor|scale_factor.*depth"):
        load_vae(tmp_path, other)


def test_loader_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "nope", magi_tiny().vae)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_vae(tmp_path, magi_tiny().vae)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .safetensors"):
        load_vae(tmp_path / "weights.bin", magi_tiny().vae)


def test_unsupported_settings_are_rejected():
    with pytest.raises(ValueError, match="use_rope"):
        MagiVAE(magi_tiny().vae.model_copy(update={"use_rope": True}))
    with pytest.raises(ValueError, match="conv_last_layer"):
        MagiVAE(magi_tiny().vae.model_copy(update={"conv_last_layer": False}))
