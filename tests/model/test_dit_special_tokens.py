"""Special tokens end to end: the engine prepends the learned tokens per chunk as the reference does.

Golden: ``golden_dit_special.*`` (reference run with ``PAD_HQ=1 PAD_DURATION=1`` and
``tiny_special_tokens.npz``; 14-token caption so that 2 prepended tokens fill
``caption_max_length`` 16).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cluster.engine import Engine
from cluster.engine.job import NULL_CAPTION_TOKENS
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, PromptSegment
from stages.config import SpecialTokensConfig, magi_tiny
from stages.dit.token_table import load_special_tokens, table_path, write_tiny_special_tokens
from stages.dit.weights import write_tiny_checkpoint
from stages.text_encoder.special_tokens import SpecialTokenTable
from tests.model.dit_fixtures import ATOL_E2E, RTOL_E2E, model_config, run_case, run_config_name
from tests.shared_data import golden_params

HQ_DURATION = SpecialTokensConfig(hq=True, duration=True)
CASES = golden_params("golden_dit_special.json", where=lambda c: c["kind"] == "e2e_walk")


@pytest.fixture(scope="module")
def special(golden_dir):
    """(cases of golden_dit_special.json, its tensors)."""
    cases = json.loads((golden_dir / "golden_dit_special.json").read_text())["cases"]
    return cases, load_file(str(golden_dir / "golden_dit_special.safetensors"))


def _tokens_config(meta: dict, **extra) -> SpecialTokensConfig:
    """The reference's ``PAD_*`` env flags of the case as a SpecialTokensConfig."""
    env = meta["special_token_env"]
    flags = {k[4:].lower(): True for k, v in env.items() if k.startswith("PAD_") and v not in (None, "", "0")}
    return SpecialTokensConfig(**{**flags, **extra})


def _setup(case, special, golden_dir, golden_models, tiny_configs, **extra):
    """(meta, tensors, ModelConfig with the case's special tokens, the case's token table, DiT)."""
    cases, g = special
    meta = cases[case]
    dit = golden_models[meta["model_config_name"]]
    run = tiny_configs["run_configs"][run_config_name(case, tiny_configs)]
    tokens = _tokens_config(meta, **extra)
    mc = model_config(meta, run, dit.cfg).model_copy(update={"special_tokens": tokens})
    table = SpecialTokenTable.load(golden_dir / meta["special_token_env"]["SPECIAL_TOKEN_PATH"])
    return meta, g, mc, table, dit


def _job(case, meta, g, mc, num_chunks=None, caption=None) -> EngineJob:
    """The case's job with its raw caption (the engine prepends the special tokens itself)."""
    caption = caption or CaptionEmbedding(g[f"{case}/caption_embs"][0, 0], g[f"{case}/emb_masks"][0])
    n = num_chunks or len(meta["yielded_chunk_indices"])
    spec = JobSpec(job_id=case, prompt_segments=(PromptSegment(0, "golden"),), num_chunks=n, height=mc.height,
                   width=mc.width, seed=meta["seed"], num_steps=meta["num_steps"])
    return EngineJob(spec, ((0, caption),))


def _book(engine: Engine, job: EngineJob):
    """The caption book the engine prepares for ``job`` (nothing allocated)."""
    return engine.preparer.prepare(job).ctx.captions


def _duration(table, remaining: int) -> torch.Tensor:
    return table.tokens[f"DURATION_TOKEN_{min(remaining, 8)}"]  # golden README: DURATION_{min(n-c-1,7)+1}


@pytest.mark.parametrize("case", CASES)
def test_engine_with_special_tokens_matches_reference(case, special, golden_dir, golden_models, tiny_configs):
    meta, g, mc, table, dit = _setup(case, special, golden_dir, golden_models, tiny_configs)
    run = run_case(Engine(mc, dit, special_tokens=table, max_active_jobs=1), _job(case, meta, g, mc), g[f"{case}/noise"])
    assert [c.index for c in run.chunks] == meta["yielded_chunk_indices"]
    worst = 0.0
    for c in run.chunks:
        ref = g[f"{case}/chunk_{c.index}"][0]
        worst = max(worst, (c.latent - ref).abs().max().item())
        torch.testing.assert_close(c.latent, ref, atol=ATOL_E2E, rtol=RTOL_E2E)
    print(f"{case}: max abs diff over yielded chunks {worst:.3e}")


@pytest.mark.parametrize("case", CASES)
def test_prepared_captions_equal_reference_y(case, special, golden_dir, golden_models, tiny_configs):
    """Chunk c gets [DURATION_{n-c}, HQ, caption]; the null caption keeps no special token."""
    meta, g, mc, table, dit = _setup(case, special, golden_dir, golden_models, tiny_configs)
    book = _book(Engine(mc, dit, special_tokens=table), _job(case, meta, g, mc))
    y, masks = g[f"{case}/y"], g[f"{case}/y_masks"]
    n = len(meta["yielded_chunk_indices"])
    for c in range(n):
        emb, mask = book.caption(c)
        assert torch.equal(emb, y[0, c]) and torch.equal(mask.float(), masks[0, c])
        assert torch.equal(book.null_y, y[1, c]) and torch.equal(book.null_mask.float(), masks[1, c])
        if mc.special_tokens.duration:
            assert torch.equal(emb[0], _duration(table, n - c))


@pytest.mark.parametrize("case", CASES)
def test_special_tokens_off_and_on_change_the_output(case, special, golden_dir, golden_models, tiny_configs):
    meta, g, mc, table, dit = _setup(case, special, golden_dir, golden_models, tiny_configs)
    off_cfg = mc.model_copy(update={"special_tokens": SpecialTokensConfig()})
    job = _job(case, meta, g, mc)
    caption = g[f"{case}/caption_embs"][0, 0]
    emb, _ = _book(Engine(off_cfg, dit), job).caption(0)
    assert torch.equal(emb[: caption.shape[0]], caption)
    first = {}
    for name, cfg in (("off", off_cfg), ("on", mc)):
        first[name] = run_case(Engine(cfg, dit, special_tokens=table), job, g[f"{case}/noise"]).chunks[0].latent
    assert (first["on"] - first["off"]).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_negative_prompt_tokens_go_to_the_null_caption_only(case, special, golden_dir, golden_models, tiny_configs):
    """Reference NEG_PROMPT: null caption = [BORDERNESS, TRANS, LOGO, CAPTION, null...][:L], mask = first 50."""
    meta, g, mc, table, dit = _setup(case, special, golden_dir, golden_models, tiny_configs, negative_prompt=True)
    book = _book(Engine(mc, dit, special_tokens=table), _job(case, meta, g, mc))
    null = dit.y_embedder.null_caption_embedding
    t = table.tokens
    want = torch.cat([torch.stack([t["BORDERNESS_TOKEN"], t["TRANS_TOKEN"], t["LOGO_TOKEN"], t["CAPTION_TOKEN"]]), null[:-4]])
    assert torch.equal(book.null_y, want)
    valid = min(NULL_CAPTION_TOKENS, null.shape[0])
    assert book.null_mask.tolist() == [1] * valid + [0] * (null.shape[0] - valid)
    emb, _ = book.caption(1)
    assert torch.equal(emb, g[f"{case}/y"][0, 1])  # conditional captions unchanged


@pytest.mark.parametrize("case", CASES)
def test_empty_caption_uses_the_null_caption_and_no_tokens(case, special, golden_dir, golden_models, tiny_configs):
    """Reference ``emb_masks.sum() == 0``: both caption rows are the null caption."""
    meta, g, mc, table, dit = _setup(case, special, golden_dir, golden_models, tiny_configs)
    length, channels = dit.cfg.caption_max_length, dit.cfg.caption_channels
    empty = CaptionEmbedding(torch.zeros(length, channels), torch.zeros(length, dtype=torch.int64))
    book = _book(Engine(mc, dit, special_tokens=table), _job(case, meta, g, mc, caption=empty))
    emb, mask = book.caption(len(meta["yielded_chunk_indices"]) - 1)
    assert torch.equal(emb, book.null_y) and torch.equal(mask, book.null_mask)


@pytest.mark.parametrize("case", CASES)
def test_duration_token_counts_generated_chunks(case, special, golden_dir, golden_models, tiny_configs):
    """DURATION_{min(remaining, 8)}: a job longer than 8 chunks starts at 8 and counts down."""
    meta, g, mc, table, dit = _setup(case, special, golden_dir, golden_models, tiny_configs, duration=True, hq=True)
    n = 3 * len(meta["yielded_chunk_indices"])
    book = _book(Engine(mc, dit, special_tokens=table), _job(case, meta, g, mc, num_chunks=n))
    for c in (0, n - 3, n - 1):
        assert torch.equal(book.caption(c)[0][0], _duration(table, n - c))
    assert torch.equal(book.caption(0)[0][1], table.tokens["HQ_TOKEN"])


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
    book = _book(engine, EngineJob(spec, ((0, CaptionEmbedding(emb, mask)),)))
    y0, m0 = book.caption(0)
    assert torch.equal(y0[0], table.tokens["DURATION_TOKEN_2"]) and torch.equal(y0[1], table.tokens["HQ_TOKEN"])
    assert torch.equal(y0[2:], emb[:-2]) and m0[:7].tolist() == [1] * 7 and int(m0.sum()) == 7
