"""DiT checkpoint I/O in the official MAGI-1 layout.

Official layout (reference ``load_sharded_safetensors_parallel_with_progress``): a folder
with ``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {key: shard}}``)
and its shards, or a folder with one ``model.safetensors``, or a model root holding the
reference variant folders ``inference_weight[.fp8][.distill]``; we also accept a single
``.safetensors`` file (see :mod:`stages.dit.checkpoint`). Keys are the reference
``VideoDiTModel`` state_dict keys, fp8 checkpoints included (:mod:`stages.dit.fp8`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stages.config import DiTConfig
from stages.dit.checkpoint import (
    INDEX_NAME, SINGLE_NAME, CheckpointMismatch, checkpoint_files, compare_layout, read_layout, resolve_checkpoint,
)
from stages.dit.embed import FusedLayerNorm
from stages.dit.fp8 import FP8, fp8_param_keys
from stages.dit.fp8_convert import quantize_state_dict
from stages.dit.model import MagiDiT
from stages.dit.token_table import TABLE_FILE, write_tiny_special_tokens

__all__ = [
    "INDEX_NAME", "SINGLE_NAME", "CheckpointMismatch", "checkpoint_files", "init_tiny_weights", "load_dit",
    "resolve_checkpoint", "write_tiny_checkpoint",
]
_LAYER_KEY = re.compile(r"^videodit_blocks\.layers\.(\d+)\.")
_HIGH_PRECISION = ("q_layernorm.", "k_layernorm.", "self_attn_post_norm.", "mlp_post_norm.", "final_layernorm.")


def expected_layout(model: MagiDiT) -> dict[str, tuple[tuple[int, ...], bool]]:
    """key -> (shape, is_fp8) of ``model``'s state_dict (works on the meta device)."""
    return {k: (tuple(v.shape), v.dtype == FP8) for k, v in model.state_dict().items()}


def _check_layout(files: dict[str, list[str]], expected: dict[str, tuple[tuple[int, ...], bool]], where: Path) -> None:
    found, problems = read_layout(files)
    diff = compare_layout(found, expected)
    parts = list(problems)
    for label, items in (("missing keys", diff["missing"]), ("unexpected keys", diff["unexpected"]),
                         ("wrong shapes", diff["wrong shapes"]), ("wrong dtypes", diff["wrong dtypes"])):
        if items:
            parts.append(f"{label}: {items}")
    if parts:
        raise CheckpointMismatch("; ".join([f"DiT checkpoint {where} does not match the model", *parts]))


def _target_dtype(key: str, model_dtype: torch.dtype, dtype: torch.dtype, fixed: set[str]) -> torch.dtype:
    """Transformer-block weights get ``dtype``; embedders, RoPE, final linear and the
    reference high-precision set (q/k norms, post-norms, final norm) stay float32; fp8
    weights and their float32 scales (``fixed``) keep the model's dtype."""
    if key in fixed:
        return model_dtype
    if not key.startswith("videodit_blocks.") or any(p in key for p in _HIGH_PRECISION) and "_xattn" not in key:
        return torch.float32 if model_dtype.is_floating_point else model_dtype
    return dtype


def _without_other_layers(files: dict[str, list[str]], layers: range, num_layers: int) -> dict[str, list[str]]:
    """``files`` without the keys of layers in [0, num_layers) outside ``layers`` (keys of
    out-of-range layers stay, so the layout check reports them)."""
    out = {}
    for shard, keys in files.items():
        kept = []
        for key in keys:
            m = _LAYER_KEY.match(key)
            if m is None or int(m.group(1)) in layers or int(m.group(1)) >= num_layers:
                kept.append(key)
        out[shard] = kept
    return out


def load_dit(
    ckpt_dir_or_file: Path, cfg: DiTConfig, device="cpu", dtype: torch.dtype = torch.float32, *, distill: bool = False,
    layers: range | None = None,
) -> MagiDiT:
    """Build a :class:`MagiDiT` on the meta device and fill it shard by shard (strict).

    Peak host memory is about one copy of the weights (tensors are assigned, not copied
    into pre-allocated parameters). Block weights are cast to ``dtype``; the reference
    high-precision modules stay float32 (reference ``_high_precision_promoter``); with
    ``cfg.fp8_quant`` the e4m3 weights and their scales are kept as stored.

    Args:
        ckpt_dir_or_file: checkpoint folder (official layout), a model root with the
            reference variant folders, or a .safetensors file.
        cfg: architecture; must match the checkpoint.
        device: where the weights go.
        dtype: dtype of the transformer-block weights.
        distill: pick ``inference_weight[.fp8].distill`` when given a model root.
        layers: global indices of the transformer layers to load (a pipeline stage's, see
            :func:`stages.parallel.weights.pp_stage_layers`); the other layers are
            :class:`stages.dit.step.AbsentLayer` and their checkpoint keys are not read.
            Embedders, RoPE, final LayerNorm and final linear are always loaded. None: all.

    Returns:
        the model in eval mode with ``requires_grad`` off.

    Raises:
        FileNotFoundError: see :func:`stages.dit.checkpoint.resolve_checkpoint` / ``checkpoint_files``.
        CheckpointMismatch: a malformed index, missing / unexpected keys, wrong shapes or
            fp8-ness, all named.
    """
    path = resolve_checkpoint(Path(ckpt_dir_or_file), fp8_quant=cfg.fp8_quant, distill=distill)
    files = checkpoint_files(path)
    with torch.device("meta"):
        model = MagiDiT(cfg)
    if layers is not None:
        model.keep_layers(layers)
        files = _without_other_layers(files, layers, cfg.num_layers)
    model_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    fixed = fp8_param_keys(model)
    _check_layout(files, expected_layout(model), path)
    for shard, keys in files.items():
        part = {}
        with safe_open(shard, "pt", device="cpu") as f:
            for key in keys:
                target = _target_dtype(key, model_dtypes[key], dtype, fixed)
                part[key] = f.get_tensor(key).to(device=device, dtype=target)
        model.load_state_dict(part, strict=False, assign=True)
        del part
    return model.eval().requires_grad_(False)


# ----- deterministic tiny checkpoints ------------------------------------------------


def init_tiny_weights(model: MagiDiT, seed: int = 0) -> None:
    """Fill ``model`` with the golden README's tiny weight-init recipe (reference golden
    ``weight_init``), in ``named_parameters`` order from a generator seeded with ``seed``:
    ``rope.bands`` kept; FusedLayerNorm weight N(0, 0.1^2) (gain 1 + w), bias N(0, 0.05^2);
    torch LayerNorm weight 1 + N(0, 0.1^2), bias N(0, 0.05^2); ``null_caption_embedding``
    N(0, 0.5^2); adaLN proj weight N(0, 0.05^2), bias N(0, 0.5^2); ``final_linear``
    N(0, (0.05 * min(1, x_rescale_factor))^2); everything else N(0, 0.02^2).
    """
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    final_std = 0.05 * min(1.0, model.cfg.x_rescale_factor)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
            leaf = name.rsplit(".", 1)[-1]
            if name == "rope.bands":
                continue
            if isinstance(owner, FusedLayerNorm):
                mean, std = 0.0, (0.1 if leaf == "weight" else 0.05)
            elif isinstance(owner, torch.nn.LayerNorm):
                mean, std = (1.0, 0.1) if leaf == "weight" else (0.0, 0.05)
            elif name.endswith("null_caption_embedding"):
                mean, std = 0.0, 0.5
            elif "ada_modulate_layer.proj" in name:
                mean, std = 0.0, (0.05 if leaf == "weight" else 0.5)
            elif name.startswith("final_linear"):
                mean, std = 0.0, final_std
            else:
                mean, std = 0.0, 0.02
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_((mean + std * noise).to(p.dtype))


def tiny_state_dict(cfg: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic tiny weights of ``cfg`` (:func:`init_tiny_weights`); with ``cfg.fp8_quant``
    the float weights are quantized to the reference fp8 layout
    (:func:`stages.dit.fp8_convert.quantize_state_dict`)."""
    model = MagiDiT(cfg.model_copy(update={"fp8_quant": False}))
    init_tiny_weights(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return quantize_state_dict(state, cfg) if cfg.fp8_quant else state


def write_tiny_checkpoint(
    cfg: DiTConfig, out_dir: Path, seed: int = 0, num_shards: int = 2, *, fp8: bool | None = None,
    special_tokens: bool = True,
) -> None:
    """Write deterministic random DiT weights (:func:`tiny_state_dict`) in the official
    layout: ``model.safetensors.index.json`` + ``model-0000i-of-0000N.safetensors``, and the
    model's special-token table ``special_tokens.npz`` (random, ``caption_channels`` wide,
    :func:`stages.dit.token_table.write_tiny_special_tokens`).

    Args:
        fp8: write the fp8 (SmoothQuant e4m3) layout; default ``cfg.fp8_quant``. ``fp8=True``
            with a float config writes the layout of ``cfg`` with ``fp8_quant=True``.
        special_tokens: also write the special-token table.

    Raises:
        ValueError: ``num_shards < 2`` (the layout is meant to exercise sharded loading).
    """
    if num_shards < 2:
        raise ValueError(f"num_shards must be >= 2, got {num_shards}")
    if fp8 is not None and fp8 != cfg.fp8_quant:
        cfg = cfg.model_copy(update={"fp8_quant": fp8})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = tiny_state_dict(cfg, seed)
    keys = list(state)
    total = sum(v.numel() * v.element_size() for v in state.values())
    per_shard, shards, acc = total / num_shards, [[] for _ in range(num_shards)], 0
    for key in keys:
        idx = min(int(acc // per_shard), num_shards - 1) if per_shard else 0
        shards[idx].append(key)
        acc += state[key].numel() * state[key].element_size()
    shards = [s for s in shards if s] or [keys]
    while len(shards) < 2 and len(shards[0]) > 1:  # one huge tensor: still split the key list
        shards = [shards[0][:1], shards[0][1:]]
    n = len(shards)
    weight_map = {}
    for i, shard_keys in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: state[k] for k in shard_keys}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard_keys})
    index = {"metadata": {"total_size": total, "seed": seed}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    if special_tokens:
        write_tiny_special_tokens(out / TABLE_FILE, cfg.caption_channels, seed=seed)
