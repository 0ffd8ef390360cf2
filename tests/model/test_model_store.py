"""The model store generates magi-tiny once, atomically, in layouts the real loaders read."""

from __future__ import annotations

import pytest

from stages.config import magi_tiny, load_preset
from stages.dit.weights import load_dit
from stages.model_store import ensure_checkpoints
from stages.text_encoder import T5TextEncoder
from stages.vae.weights import load_vae


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, ensure_checkpoints(magi_tiny(), root)


def test_generated_layouts_load_with_the_real_loaders(store):
    _, paths = store
    cfg = magi_tiny()
    assert (paths.dit / "model.safetensors.index.json").is_file()
    assert len(list(paths.dit.glob("model-*-of-*.safetensors"))) >= 2
    dit = load_dit(paths.dit, cfg.dit)
    assert sum(p.numel() for p in dit.parameters()) > 0
    assert not any(p.is_meta for p in dit.parameters())
    vae = load_vae(paths.vae, cfg.vae)
    assert not any(p.is_meta for p in vae.parameters())
    emb, mask = T5TextEncoder(paths.text_encoder, cfg.text_encoder).encode(["a red kite over the sea"])[0]
    assert emb.shape == (cfg.text_encoder.max_length, cfg.dit.caption_channels)
    assert int(mask.sum()) > 0


def test_second_call_reuses_the_checkpoint(store):
    root, paths = store
    before = {p: p.stat().st_mtime_ns for p in paths.dit.iterdir()}
    again = ensure_checkpoints(magi_tiny(), root)
    assert again == paths
    assert {p: p.stat().st_mtime_ns for p in again.dit.iterdir()} == before
    assert not [p for p in root.iterdir() if p.name.startswith(".magi-tiny-")]  # no temp folders left


def test_generation_is_deterministic(store, tmp_path):
    _, paths = store
    other = ensure_checkpoints(magi_tiny(), tmp_path)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (other.dit / name).read_bytes() == (paths.dit / name).read_bytes()


def test_unknown_preset_and_missing_real_checkpoint(tmp_path):
    with pytest.raises(KeyError, match="unknown model config"):
        load_preset("magi-nope")
    real = magi_tiny().model_copy(update={"name": "magi-real"})
    with pytest.raises(FileNotFoundError, match="magi-real"):
        ensure_checkpoints(real, tmp_path)
