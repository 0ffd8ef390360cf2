"""Special-token prepending against the reference golden run with PAD_HQ=1 PAD_DURATION=1."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.config import SpecialTokensConfig
from stages.text_encoder.special_tokens import SpecialTokenTable, special_token_keys

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(os.environ.get("MAGI_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
needs_golden = pytest.mark.skipif(not (GOLDEN / "golden_dit_special.safetensors").exists(),
                                  reason=f"golden data not found at {GOLDEN}")
CASE = "e2e_t2v_base_cfg3_special_tokens/"


@needs_golden
def test_matches_reference_y_for_every_chunk():
    golden = load_file(str(GOLDEN / "golden_dit_special.safetensors"))
    table = SpecialTokenTable.load(GOLDEN / "tiny_special_tokens.npz")
    caption = golden[CASE + "caption_embs"][0, 0]  # (14, 64)
    mask = golden[CASE + "emb_masks"][0]  # (14,)
    y, y_masks = golden[CASE + "y"], golden[CASE + "y_masks"]  # (2, 4, 16, 64), (2, 4, 16)
    flags = SpecialTokensConfig(hq=True, duration=True)
    # the golden caption is 14 tokens in a 16-token model: pad to L = 16 first, as the encoder would
    length = y.shape[2]
    padded = torch.cat([caption, torch.zeros(length - caption.shape[0], caption.shape[1])])
    padded_mask = torch.cat([mask, torch.zeros(length - mask.shape[0], dtype=mask.dtype)])
    for c in range(4):
        keys = special_token_keys(flags, c, num_chunks=4)
        assert keys == ["HQ_TOKEN", f"DURATION_TOKEN_{4 - c}"]
        emb, m = table.prepend(padded, padded_mask, keys)
        assert emb.shape == (length, 64) and m.dtype == torch.int64
        assert torch.equal(emb, y[0, c])
        assert torch.equal(m.float(), y_masks[0, c])


@needs_golden
def test_table_rows_are_float16_rounded():
    table = SpecialTokenTable.load(GOLDEN / "special_tokens.npz")
    raw = np.load(GOLDEN / "special_tokens.npz")["other_tokens"][1]
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
