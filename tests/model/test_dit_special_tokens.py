"""Special tokens end to end: the engine prepends the learned tokens per chunk as the reference does.

Golden: ``golden_dit_special.*`` (reference run with ``PAD_HQ=1 PAD_DURATION=1`` and
``tiny_special_tokens.npz``; 14-token caption so that 2 prepended tokens fill
``caption_max_length`` 16).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cluster.engine import Engine
from cluster.engine.job import NULL_CAPTION_TOKENS
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, PromptSegment
from stages.config import SpecialTokensConfig, magi_tiny
from stages.dit.token_table import load_special_tokens, table_path, write_tiny_special_tokens
from stages.dit.weights import write_tiny_checkpoint
from stages.text_encoder.special_tokens import SpecialTokenTable
from tests.model.dit_fixtures import ATOL_E2E, GOLDEN_DIR, RTOL_E2E, model_config_for_run, needs_golden

CASE = "e2e_t2v_base_cfg3_special_tokens"
HQ_DURATION = SpecialTokensConfig(hq=True, duration=True)


@pytest.fixture(scope="module")
def special_golden():
    if not (GOLDEN_DIR / "golden_dit_special.safetensors").exists():
        pytest.skip(f"golden data not found at {GOLDEN_DIR}")
    return load_file(str(GOLDEN_DIR / "golden_dit_special.safetensors"))


@pytest.fixture(scope="module")
def golden_table():
    return SpecialTokenTable.load(GOLDEN_DIR / "tiny_special_tokens.npz")


def _start(golden_models, tiny_configs, g, table, special=HQ_DURATION, num_chunks=4, caption=None):
    dit = golden_models["base"]
    mc = model_config_for_run(tiny_configs["run_configs"]["base_cfg3"], dit.cfg).model_copy(update={"special_tokens": special})
    caption = caption or CaptionEmbedding(g[f"{CASE}/caption_embs"][0, 0], g[f"{CASE}/emb_masks"][0])
    spec = JobSpec(job_id=CASE, prompt_segments=(PromptSegment(0, "golden"),), num_chunks=num_chunks, height=64, width=64,
                   seed=1234, num_steps=8)
    noise = g[f"{CASE}/noise"] if num_chunks == 4 else None
    return Engine(mc, dit, special_tokens=table).start(EngineJob(spec, ((0, caption),)), noise=noise)


@needs_golden
def test_engine_with_special_tokens_matches_reference(special_golden, golden_table, golden_models, tiny_configs):
    job = _start(golden_models, tiny_configs, special_golden, golden_table)
    events = []
    while not job.done:
        events.extend(job.step())
    chunks = [e for e in events if isinstance(e, LatentChunk)]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    worst = 0.0
    for c in chunks:
        ref = special_golden[f"{CASE}/chunk_{c.index}"][0]
        worst = max(worst, (c.latent - ref).abs().max().item())
        torch.testing.assert_close(c.latent, ref, atol=ATOL_E2E, rtol=RTOL_E2E)
    print(f"{CASE}: max abs diff over yielded chunks {worst:.3e}")


@needs_golden
def test_prepared_captions_equal_reference_y(special_golden, golden_table, golden_models, tiny_configs):
    """Chunk c gets [DURATION_{4-c}, HQ, caption]; the null caption keeps no special token."""
    book = _start(golden_models, tiny_configs, special_golden, golden_table)._ctx.captions
    y, masks = special_golden[f"{CASE}/y"], special_golden[f"{CASE}/y_masks"]
    for c in range(4):
        emb, mask = book.caption(c)
        assert torch.equal(emb, y[0, c]) and torch.equal(mask.float(), masks[0, c])
        assert torch.equal(book.null_y, y[1, c]) and torch.equal(book.null_mask.float(), masks[1, c])
    assert torch.equal(book.caption(0)[0][0], golden_table.tokens["DURATION_TOKEN_4"])
    assert torch.equal(book.caption(3)[0][0], golden_table.tokens["DURATION_TOKEN_1"])


@needs_golden
def test_special_tokens_off_by_default_and_change_the_output(special_golden, golden_table, golden_models, tiny_configs):
    off = _start(golden_models, tiny_configs, special_golden, golden_table, special=SpecialTokensConfig())
    emb, _ = off._ctx.captions.caption(0)
    assert torch.equal(emb[:14], special_golden[f"{CASE}/caption_embs"][0, 0])
    on = _start(golden_models, tiny_configs, special_golden, golden_table)
    first = {}
    for name, job in (("off", off), ("on", on)):
        while name not in first:
            first.update({name: e.latent for e in job.step() if isinstance(e, LatentChunk)})
    assert (first["on"] - first["off"]).abs().max() > 1e-3


@needs_golden
def test_negative_prompt_tokens_go_to_the_null_caption_only(special_golden, golden_table, golden_models, tiny_configs):
    """Reference NEG_PROMPT: null caption = [BORDERNESS, TRANS, LOGO, CAPTION, null...][:L], mask = first 50."""
    neg = SpecialTokensConfig(hq=True, duration=True, negative_prompt=True)
    book = _start(golden_models, tiny_configs, special_golden, golden_table, special=neg)._ctx.captions
    null = golden_models["base"].y_embedder.null_caption_embedding
    t = golden_table.tokens
    want = torch.cat([torch.stack([t["BORDERNESS_TOKEN"], t["TRANS_TOKEN"], t["LOGO_TOKEN"], t["CAPTION_TOKEN"]]), null[:-4]])
    assert torch.equal(book.null_y, want)
    assert book.null_mask.tolist() == [1] * min(NULL_CAPTION_TOKENS, null.shape[0]) + [0] * max(0, null.shape[0] - 50)
    emb, _ = book.caption(1)
    assert torch.equal(emb, special_golden[f"{CASE}/y"][0, 1])  # conditional captions unchanged


@needs_golden
def test_empty_caption_uses_the_null_caption_and_no_tokens(special_golden, golden_table, golden_models, tiny_configs):
    """Reference ``emb_masks.sum() == 0``: both caption rows are the null caption."""
    empty = CaptionEmbedding(torch.zeros(16, 64), torch.zeros(16, dtype=torch.int64))
    book = _start(golden_models, tiny_configs, special_golden, golden_table, caption=empty)._ctx.captions
    emb, mask = book.caption(2)
    assert torch.equal(emb, book.null_y) and torch.equal(mask, book.null_mask)


@needs_golden
def test_duration_token_counts_generated_chunks_and_endless_streams(special_golden, golden_table, golden_models, tiny_configs):
    book = _start(golden_models, tiny_configs, special_golden, golden_table, num_chunks=12)._ctx.captions
    tokens = golden_table.tokens
    assert torch.equal(book.caption(0)[0][0], tokens["DURATION_TOKEN_8"])
    assert torch.equal(book.caption(9)[0][0], tokens["DURATION_TOKEN_3"])
    assert torch.equal(book.caption(0)[0][1], tokens["HQ_TOKEN"])


def test_engine_needs_the_table_when_tokens_are_enabled(tmp_path):
    cfg = magi_tiny().model_copy(update={"special_tokens": HQ_DURATION})
    from stages.dit.model import MagiDiT

    with torch.device("meta"):
        dit = MagiDiT(cfg.dit)
    with pytest.raises(ValueError, match="special_tokens"):
        Engine(cfg, dit, device="meta")
    with pytest.raises(FileNotFoundError, match="special_tokens.table"):
        load_special_tokens(cfg, tmp_path)
    assert load_special_tokens(magi_tiny(), tmp_path) is None  # disabled: no table needed
    write_tiny_special_tokens(tmp_path / "wide.npz", 32)
    wide = cfg.model_copy(update={"special_tokens": SpecialTokensConfig(hq=True, table=str(tmp_path / "wide.npz"))})
    with pytest.raises(ValueError, match="width 32"):
        load_special_tokens(wide, tmp_path / "elsewhere")


def test_tiny_checkpoint_ships_its_table_and_from_checkpoint_uses_it(tmp_path):
    """The tiny model's table is written with its checkpoint; runtime reads it from there."""
    cfg = magi_tiny().model_copy(update={"special_tokens": HQ_DURATION})
    write_tiny_checkpoint(cfg.dit, tmp_path, seed=0)
    assert table_path(cfg, tmp_path) == tmp_path / "special_tokens.npz"
    engine = Engine.from_checkpoint(cfg, tmp_path)
    table = SpecialTokenTable.load(tmp_path / "special_tokens.npz")
    assert table.dim == cfg.dit.caption_channels and len(table.tokens) == 17
    emb = torch.randn(cfg.dit.caption_max_length, cfg.dit.caption_channels)
    mask = torch.zeros(cfg.dit.caption_max_length, dtype=torch.int64)
    mask[:5] = 1
    spec = JobSpec(job_id="t", prompt_segments=(PromptSegment(0, "a"),), num_chunks=2, height=cfg.height,
                   width=cfg.width, seed=1, num_steps=4)
    book = engine.start(EngineJob(spec, ((0, CaptionEmbedding(emb, mask)),)))._ctx.captions
    y0, m0 = book.caption(0)
    assert torch.equal(y0[0], table.tokens["DURATION_TOKEN_2"]) and torch.equal(y0[1], table.tokens["HQ_TOKEN"])
    assert torch.equal(y0[2:], emb[:-2]) and m0[:7].tolist() == [1] * 7 and int(m0.sum()) == 7
