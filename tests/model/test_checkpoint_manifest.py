"""Checkpoint layout tools: expected manifests vs the reference's, and ``verify_checkpoint`` / CLI entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.config import SpecialTokensConfig, load_preset, magi_tiny
from stages.config_compat import read_reference_config
from stages.dit.checkpoint import INDEX_NAME
from stages.dit.manifest import expected_manifest, main_manifest, main_verify, verify_checkpoint, verify_model_checkpoint
from stages.dit.token_table import table_path
from stages.dit.weights import CheckpointMismatch, load_dit, write_tiny_checkpoint

REFERENCE_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "reference_configs"
CASES = [
    ("dit_manifest_4.5B.json", "4.5B_base", "magi-4.5B-base"),
    ("dit_manifest_4.5B.json", "4.5B_distill", "magi-4.5B-distill"),
    ("dit_manifest_4.5B.json", "4.5B_distill_quant", "magi-4.5B-distill-fp8"),
    ("dit_manifest_24B.json", "24B_base", "magi-24B-base"),
    ("dit_manifest_24B.json", "24B_distill", "magi-24B-distill"),
    ("dit_manifest_24B.json", "24B_distill_quant", "magi-24B-distill-fp8"),
]


@pytest.mark.parametrize("manifest,config,preset", CASES)
def test_expected_manifest_equals_reference_key_for_key(manifest, config, preset, golden_dir):
    entry = json.loads((golden_dir / manifest).read_text())["configs"][config]
    cfg = load_preset(preset)
    assert cfg.dit.fp8_quant == entry["fp8_quant"] and cfg.sampling.distill == entry["distill"]
    got = expected_manifest(cfg.dit)
    assert [(e.key, list(e.shape), str(e.dtype)) for e in got] == [
        (x["key"], x["shape"], x["dtype"]) for x in entry["state_dict"]]
    promoted = expected_manifest(cfg.dit, promoted=True)
    assert [str(e.dtype) for e in promoted] == [x["dtype_after_high_precision_promoter"] for x in entry["state_dict"]]
    assert len(got) == entry["num_tensors"]
    assert sum(torch.Size(e.shape).numel() for e in got) == entry["num_elements"]
    from_file = read_reference_config(REFERENCE_CONFIGS / Path(entry["config_file"]).name).model
    assert expected_manifest(from_file.dit) == got


def _tiny(tmp_path: Path, **kw) -> Path:
    out = tmp_path / "dit"
    write_tiny_checkpoint(magi_tiny().dit, out, seed=2, **kw)
    return out


def _edit(folder: Path, fn) -> None:
    """Apply ``fn(state)`` to the checkpoint's tensors and rewrite shards + index consistently."""
    index = json.loads((folder / INDEX_NAME).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state = load_file(str(folder / shard))
        fn(state)
        save_file(state, str(folder / shard))
        for k in [k for k, s in index["weight_map"].items() if s == shard]:
            del index["weight_map"][k]
        index["weight_map"].update({k: shard for k in state})
    (folder / INDEX_NAME).write_text(json.dumps(index))


RENAMED = "videodit_blocks.layers.1.self_attention.linear_qkv.k.weight"
RESHAPED = "videodit_blocks.layers.0.mlp.linear_fc2.weight"


def _break(state: dict) -> None:
    if RENAMED in state:
        state[RENAMED + "_renamed"] = state.pop(RENAMED)
    if RESHAPED in state:
        state[RESHAPED] = state[RESHAPED][:, :-1].contiguous()


def test_verify_names_a_renamed_key_and_a_changed_shape(tmp_path, capsys):
    folder = _tiny(tmp_path)
    cfg = magi_tiny().dit
    assert verify_checkpoint(folder, cfg) == []
    assert main_verify(folder, "magi-tiny") == 0
    assert "OK" in capsys.readouterr().out
    _edit(folder, _break)
    problems = verify_checkpoint(folder, cfg)
    assert problems == [
        f"missing key: {RENAMED}",
        f"unexpected key: {RENAMED}_renamed",
        f"wrong shape: {RESHAPED} (expected [256, 512], got [256, 511])",
    ]
    assert main_verify(folder, "magi-tiny") == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and RENAMED in out and RESHAPED in out
    with pytest.raises(CheckpointMismatch) as err:
        load_dit(folder, cfg)
    assert RENAMED in str(err.value) and RESHAPED in str(err.value)


def test_verify_reports_bad_index_and_missing_shard(tmp_path):
    folder = _tiny(tmp_path)
    index = json.loads((folder / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["x_embedder.weight"] = shards[-1]  # listed in a shard that does not hold it
    (folder / INDEX_NAME).write_text(json.dumps(index))
    problems = verify_checkpoint(folder, magi_tiny().dit)
    assert any(p.startswith("bad index: key x_embedder.weight is not in shard") for p in problems)
    assert "missing key: x_embedder.weight" in problems
    (folder / shards[0]).unlink()
    problems = verify_checkpoint(folder, magi_tiny().dit)
    assert any(p.startswith(f"missing shard: {shards[0]}") for p in problems)
    (folder / INDEX_NAME).write_text("{not json")
    assert verify_checkpoint(folder, magi_tiny().dit)[0].startswith("bad index")
    assert verify_checkpoint(tmp_path / "nowhere", magi_tiny().dit)[0].startswith("no checkpoint")


def test_variant_folders_of_a_model_root(tmp_path):
    """Reference layout: <root>/inference_weight[.fp8][.distill]/ (reference ``load_state_dict``)."""
    cfg = magi_tiny().dit
    write_tiny_checkpoint(cfg, tmp_path / "inference_weight.distill", seed=1)
    assert verify_checkpoint(tmp_path, cfg, distill=True) == []
    assert verify_checkpoint(tmp_path, cfg)[0].startswith("no checkpoint")
    model = load_dit(tmp_path, cfg, distill=True)
    assert not any(p.is_meta for p in model.parameters())
    fp8 = cfg.model_copy(update={"num_layers": 3, "fp8_quant": True})
    write_tiny_checkpoint(fp8, tmp_path / "inference_weight.fp8.distill", seed=1)
    assert verify_checkpoint(tmp_path, fp8, distill=True) == []
    tiny = magi_tiny()
    model_cfg = tiny.model_copy(update={
        "dit": fp8, "special_tokens": SpecialTokensConfig(hq=True),
        "sampling": tiny.sampling.model_copy(update={"distill": True, "cfg_number": 1})})
    assert table_path(model_cfg, tmp_path) == tmp_path / "inference_weight.fp8.distill" / "special_tokens.npz"
    assert verify_model_checkpoint(tmp_path, model_cfg) == []


def test_fp8_layout_checks_and_dtype_mismatch(tmp_path):
    fp8 = magi_tiny().dit.model_copy(update={"num_layers": 3, "fp8_quant": True})
    folder = tmp_path / "fp8"
    write_tiny_checkpoint(fp8, folder, seed=0)
    assert verify_checkpoint(folder, fp8) == []
    float_problems = verify_checkpoint(folder, fp8.model_copy(update={"fp8_quant": False}))
    assert "unexpected key: videodit_blocks.layers.1.mlp.linear_fc2.smooth_scale" in float_problems
    assert any(p.startswith("wrong shape: videodit_blocks.layers.1.mlp.linear_fc1.weight") for p in float_problems)
    key = "videodit_blocks.layers.1.mlp.linear_fc1.weight"

    def to_bf16(state):
        if key in state:
            state[key] = state[key].to(torch.bfloat16)

    _edit(folder, to_bf16)
    assert verify_checkpoint(folder, fp8) == [f"wrong dtype: {key} (expected F8_E4M3, got BF16)"]
    with pytest.raises(CheckpointMismatch, match="wrong dtypes"):
        load_dit(folder, fp8)


def test_model_verify_checks_the_special_token_table(tmp_path):
    cfg = magi_tiny().model_copy(update={"special_tokens": SpecialTokensConfig(hq=True)})
    folder = _tiny(tmp_path)
    assert verify_model_checkpoint(folder, cfg) == []
    folder2 = tmp_path / "no_table"
    write_tiny_checkpoint(cfg.dit, folder2, special_tokens=False)
    assert verify_model_checkpoint(folder2, cfg) == [
        f"missing special-token table: {folder2 / 'special_tokens.npz'} (special_tokens.table)"]


def test_main_manifest_prints_every_tensor(capsys):
    assert main_manifest("magi-4.5B-distill-fp8") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1410 + 1 and lines[-1].startswith("# magi-4.5B-distill-fp8: 1410 tensors")
    assert "videodit_blocks.layers.1.mlp.linear_fc2.smooth_scale\t[1, 12288]\tfloat32" in lines
    assert main_manifest(str(REFERENCE_CONFIGS / "24B_base_config.json"), as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["num_tensors"] == 1262
    assert main_manifest("no-such-model") == 2
    assert "unknown model config" in capsys.readouterr().err


def test_magi_cli_checkpoint_commands(tmp_path, capsys):
    from cluster.client.cli import main as magi

    folder = _tiny(tmp_path)
    assert magi(["checkpoint", "verify", str(folder), "--config", "magi-tiny"]) == 0
    _edit(folder, _break)
    assert magi(["checkpoint", "verify", str(folder), "--config", "magi-tiny"]) == 1
    out = capsys.readouterr().out
    assert f"unexpected key: {RENAMED}_renamed" in out and f"wrong shape: {RESHAPED}" in out
    assert magi(["checkpoint", "manifest", "--config", "magi-tiny"]) == 0
    assert RESHAPED in capsys.readouterr().out
    assert magi(["checkpoint", "manifest", "--config", "magi-nope"]) == 2
