"""T5 text encoder stage on a generated tiny checkpoint (real transformers loaders, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5EncoderModel

from stages.config import magi_tiny
from stages.errors import InvalidInput
from stages.text_encoder import T5TextEncoder, preprocess_caption, write_tiny_checkpoint
from stages.text_encoder.checkpoint import t5_config

CFG = magi_tiny().text_encoder
L, D = CFG.max_length, CFG.d_model
PROMPTS = [
    "A space shuttle launching into orbit, with flames and smoke billowing out from the engines",
    "a cat grooming itself meticulously with its tongue",
    "A beautiful coastal beach in spring, waves lapping on sand, Van Gogh style",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("t5")
    write_tiny_checkpoint(CFG, out, seed=0)
    return out


@pytest.fixture()
def encoder(ckpt) -> T5TextEncoder:
    return T5TextEncoder(ckpt, CFG)


def test_checkpoint_has_transformers_layout_and_loads_offline(ckpt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = set(os.listdir(ckpt))
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer.json", "tokenizer_config.json"} <= names
    model = T5EncoderModel.from_pretrained(str(ckpt), local_files_only=True)
    assert (model.config.d_model, model.config.num_layers, model.config.num_heads) == (D, CFG.num_layers, CFG.num_heads)
    assert model.config.feed_forward_proj == "gated-gelu"
    tok = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    assert len(tok) == CFG.vocab_size
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    # weights round-trip exactly through safetensors -> from_pretrained
    stored = load_file(str(ckpt / "model.safetensors"))
    loaded = model.state_dict()
    for key, value in stored.items():
        assert torch.equal(loaded[key], value), key


def test_checkpoint_is_deterministic_and_seeded(ckpt, tmp_path):
    write_tiny_checkpoint(CFG, tmp_path / "again", seed=0)
    for name in os.listdir(ckpt):
        assert (ckpt / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    write_tiny_checkpoint(CFG, tmp_path / "seed1", seed=1)
    w0 = load_file(str(ckpt / "model.safetensors"))
    w1 = load_file(str(tmp_path / "seed1" / "model.safetensors"))
    assert not torch.equal(w0["shared.weight"], w1["shared.weight"])
    assert (ckpt / "spiece.model").read_bytes() == (tmp_path / "seed1" / "spiece.model").read_bytes()


def test_checkpoint_restores_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_checkpoint(CFG, tmp_path, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_loader_rejects_mismatched_config_and_missing_dir(ckpt, tmp_path):
    with pytest.raises(ValueError, match="text_encoder.d_model"):
        T5TextEncoder(ckpt, CFG.model_copy(update={"d_model": 128}))
    with pytest.raises(FileNotFoundError):
        T5TextEncoder(tmp_path / "nope", CFG)


def test_tiny_vocab_too_small_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_checkpoint(CFG.model_copy(update={"vocab_size": 120}), tmp_path)


def test_encode_shapes_dtypes_and_matches_direct_t5_forward(encoder, ckpt):
    out = encoder.encode(PROMPTS)
    assert len(out) == len(PROMPTS)
    tok = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    model = T5EncoderModel.from_pretrained(str(ckpt), local_files_only=True).eval()
    for prompt, (emb, mask) in zip(PROMPTS, out):
        assert emb.shape == (L, D) and emb.dtype == torch.float32
        assert mask.shape == (L,) and mask.dtype == torch.int64
        assert torch.isfinite(emb).all()
        ids = tok([preprocess_caption(prompt)], max_length=L, padding="max_length", truncation=True,
                  return_tensors="pt")
        with torch.no_grad():
            ref = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[0]
        torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(mask, ids["attention_mask"][0])


def test_masks_match_tokenization_length(encoder, ckpt):
    tok = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    long_prompt = " ".join(PROMPTS * 5)
    for prompt in PROMPTS + [long_prompt, "a"]:
        _, mask = encoder.encode([prompt])[0]
        n = min(len(tok(preprocess_caption(prompt))["input_ids"]), L)
        assert int(mask.sum()) == n
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
    assert int(encoder.encode([long_prompt])[0][1].sum()) == L  # truncated to max_length


def test_encode_is_deterministic_across_instances_and_batching(ckpt):
    a = T5TextEncoder(ckpt, CFG).encode(PROMPTS)
    b = T5TextEncoder(ckpt, CFG).encode(PROMPTS)
    singles = T5TextEncoder(ckpt, CFG, max_batch_size=1)
    c = [singles.encode([p])[0] for p in PROMPTS]
    assert singles.stats.forwards == len(PROMPTS)
    for (ea, ma), (eb, mb), (ec, mc) in zip(a, b, c):
        assert torch.equal(ea, eb) and torch.equal(ma, mb)
        torch.testing.assert_close(ea, ec, atol=1e-5, rtol=1e-5)
        assert torch.equal(ma, mc)


def test_cache_hit_on_repeat_and_on_same_cleaned_caption(encoder):
    first = encoder.encode(PROMPTS)
    assert encoder.stats.misses == 3 and encoder.stats.hits == 0 and encoder.stats.forwards == 1
    again = encoder.encode([PROMPTS[1]])
    assert encoder.stats.forwards == 1 and encoder.stats.hits == 1
    assert torch.equal(again[0][0], first[1][0])
    # different raw text, same cleaned caption -> same cache entry
    encoder.encode(["  A CAT grooming itself   meticulously with its tongue "])
    assert encoder.stats.forwards == 1 and encoder.stats.hits == 2
    # duplicates inside one call are encoded once
    encoder.encode(["a red bicycle", "a red bicycle"])
    assert encoder.stats.forwards == 2 and encoder.stats.misses == 4


def test_results_are_fresh_tensors(encoder):
    emb, mask = encoder.encode([PROMPTS[0]])[0]
    kept = emb.clone()
    emb.zero_()
    mask.zero_()
    emb2, mask2 = encoder.encode([PROMPTS[0]])[0]
    assert torch.equal(emb2, kept) and int(mask2.sum()) > 0


def test_lru_eviction(ckpt):
    enc = T5TextEncoder(ckpt, CFG, cache_size=2)
    enc.encode(["a cat"])
    enc.encode(["a dog"])
    enc.encode(["a cat"])  # refresh: "a dog" is now least recent
    enc.encode(["a bird"])
    assert enc.stats.size == 2 and enc.stats.forwards == 3
    enc.encode(["a cat"])
    assert enc.stats.forwards == 3
    enc.encode(["a dog"])
    assert enc.stats.forwards == 4


def test_batches_are_split_by_max_batch_size(ckpt):
    enc = T5TextEncoder(ckpt, CFG, max_batch_size=2)
    enc.encode([f"a cat number {w}" for w in ("one", "two", "three", "four", "five")])
    assert enc.stats.forwards == 3


def test_bad_prompt_fails_whole_call_before_any_forward(encoder):
    with pytest.raises(InvalidInput) as err:
        encoder.encode(["a cat", "   "])
    assert err.value.field == "prompt[1]"
    assert encoder.stats.forwards == 0
    with pytest.raises(TypeError):
        encoder.encode("a cat")


def test_rewriting_over_another_checkpoint_replaces_the_tokenizer(tmp_path):
    other = CFG.model_copy(update={"vocab_size": 400})
    write_tiny_checkpoint(other, tmp_path)
    write_tiny_checkpoint(CFG, tmp_path)
    assert len(AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)) == CFG.vocab_size
    T5TextEncoder(tmp_path, CFG).encode(["a cat"])
