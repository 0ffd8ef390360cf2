"""Special-token prepending against the reference golden run with PAD_HQ=1 PAD_DURATION=1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.config import SpecialTokensConfig
from stages.text_encoder.special_tokens import SpecialTokenTable, special_token_keys

from tests.shared_data import golden_params

CASES = golden_params("golden_dit_special.json", where=lambda c: c["kind"] == "e2e_walk")


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_y_for_every_chunk(case, golden_dir):
    meta = json.loads((golden_dir / "golden_dit_special.json").read_text())["cases"][case]
    golden = load_file(str(golden_dir / "golden_dit_special.safetensors"))
    env = meta["special_token_env"]
    table = SpecialTokenTable.load(golden_dir / env["SPECIAL_TOKEN_PATH"])
    caption = golden[f"{case}/caption_embs"][0, 0]  # (L_in, C)
    mask = golden[f"{case}/emb_masks"][0]  # (L_in,)
    y, y_masks = golden[f"{case}/y"], golden[f"{case}/y_masks"]  # (2, chunks, L, C), (2, chunks, L)
    flags = SpecialTokensConfig(**{k[4:].lower(): True for k, v in env.items() if k.startswith("PAD_") and v})
    # the golden caption is shorter than the model's: pad to L first, as the encoder would
    length, n = y.shape[2], len(meta["yielded_chunk_indices"])
    padded = torch.cat([caption, torch.zeros(length - caption.shape[0], caption.shape[1])])
    padded_mask = torch.cat([mask, torch.zeros(length - mask.shape[0], dtype=mask.dtype)])
    for c in range(n):
        keys = special_token_keys(flags, c, num_chunks=n)
        if flags.duration:
            assert keys[-1] == f"DURATION_TOKEN_{min(n - c, 8)}"
        emb, m = table.prepend(padded, padded_mask, keys)
        assert emb.shape == (length, caption.shape[1]) and m.dtype == torch.int64
        assert torch.equal(emb, y[0, c])
        assert torch.equal(m.float(), y_masks[0, c])


def test_table_rows_are_float16_rounded(golden_dir):
    table = SpecialTokenTable.load(golden_dir / "special_tokens.npz")
    raw = np.load(golden_dir / "special_tokens.npz")["other_tokens"][1]
    assert table.dim == 4096
    assert torch.equal(table.tokens["HQ_TOKEN"], torch.from_numpy(raw.astype(np.float16).astype(np.float32)))


def test_flag_order_duration_choice_and_truncation():
    flags = SpecialTokensConfig(static=True, hq=True, two_d_anime=True, duration=True)
    assert special_token_keys(flags, 0, 20) == ["STATIC_FIRST_FRAMES_TOKEN", "HQ_TOKEN", "TWO_D_ANIME_TOKEN", "DURATION_TOKEN_8"]
    assert special_token_keys(flags, 19, 20)[-1] == "DURATION_TOKEN_1"
    assert special_token_keys(flags, 5, None)[-1] == "DURATION_TOKEN_8"
    assert special_token_keys(SpecialTokensConfig(), 0, 3) == []
    with pytest.raises(ValueError):
        special_token_keys(flags, 3, 3)
    table = SpecialTokenTable({"A": torch.full((2,), 1.0), "B": torch.full((2,), 2.0)})
    emb = torch.arange(8.0).reshape(4, 2)
    out, mask = table.prepend(emb, torch.tensor([1, 1, 0, 0]), ["A", "B"])
    assert out[:, 0].tolist() == [2.0, 1.0, 0.0, 2.0] and mask.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        table.prepend(torch.zeros(4, 3), torch.ones(4, dtype=torch.int64), ["A"])
