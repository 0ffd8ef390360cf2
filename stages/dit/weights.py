"""DiT checkpoint I/O in the official MAGI-1 layout.

Official layout (reference ``load_sharded_safetensors_parallel_with_progress``): a folder
with ``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {key: shard}}``)
and its shards, or a folder with one ``model.safetensors``; we also accept a single
``.safetensors`` file. Keys are the reference ``VideoDiTModel`` state_dict keys.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stages.config import DiTConfig
from stages.dit.embed import FusedLayerNorm
from stages.dit.model import MagiDiT

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_HIGH_PRECISION = ("q_layernorm.", "k_layernorm.", "self_attn_post_norm.", "mlp_post_norm.", "final_layernorm.")


class CheckpointMismatch(ValueError):
    """The checkpoint's keys/shapes differ from the model's; the message names every offending key."""


def checkpoint_files(path: Path) -> dict[str, list[str]]:
    """Map shard file -> its tensor keys for a checkpoint folder or a single file.

    Raises:
        FileNotFoundError: no index, no ``model.safetensors`` and not a .safetensors file,
            or a shard named in the index is absent.
    """
    path = Path(path)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            return {str(path): list(f.keys())}
    index = path / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = defaultdict(list)
        for key, shard in weight_map.items():
            shards[str(path / shard)].append(key)
        for shard in shards:
            if not Path(shard).exists():
                raise FileNotFoundError(f"shard {shard} named in {index} is missing")
        return dict(shards)
    if (path / SINGLE_NAME).exists():
        return checkpoint_files(path / SINGLE_NAME)
    raise FileNotFoundError(f"no DiT checkpoint at {path}: expected {INDEX_NAME}, {SINGLE_NAME} or a .safetensors file")


def _check_layout(files: dict[str, list[str]], expected: dict[str, torch.Size], where: Path) -> None:
    found: dict[str, tuple[int, ...]] = {}
    for shard, keys in files.items():
        with safe_open(shard, "pt") as f:
            for key in keys:
                found[key] = tuple(f.get_slice(key).get_shape())
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k} (expected {list(expected[k])}, got {list(found[k])})"
        for k in set(found) & set(expected)
        if tuple(expected[k]) != found[k]
    )
    if missing or unexpected or wrong:
        parts = [f"DiT checkpoint {where} does not match the model"]
        if missing:
            parts.append(f"missing keys: {missing}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected}")
        if wrong:
            parts.append(f"wrong shapes: {wrong}")
        raise CheckpointMismatch("; ".join(parts))


def _target_dtype(key: str, model_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """Transformer-block weights get ``dtype``; embedders, RoPE, final linear and the
    reference high-precision set (q/k norms, post-norms, final norm) stay float32."""
    if not key.startswith("videodit_blocks.") or any(p in key for p in _HIGH_PRECISION) and "_xattn" not in key:
        return torch.float32 if model_dtype.is_floating_point else model_dtype
    return dtype


def load_dit(ckpt_dir_or_file: Path, cfg: DiTConfig, device="cpu", dtype: torch.dtype = torch.float32) -> MagiDiT:
    """Build a :class:`MagiDiT` on the meta device and fill it shard by shard (strict).

    Peak host memory is about one copy of the weights (tensors are assigned, not copied
    into pre-allocated parameters). Block weights are cast to ``dtype``; the reference
    high-precision modules stay float32 (reference ``_high_precision_promoter``).

    Args:
        ckpt_dir_or_file: checkpoint folder (official layout) or a .safetensors file.
        cfg: architecture; must match the checkpoint.
        device: where the weights go.
        dtype: dtype of the transformer-block weights.

    Returns:
        the model in eval mode with ``requires_grad`` off.

    Raises:
        FileNotFoundError: see :func:`checkpoint_files`.
        CheckpointMismatch: missing / unexpected keys or wrong shapes, all named.
    """
    path = Path(ckpt_dir_or_file)
    files = checkpoint_files(path)
    with torch.device("meta"):
        model = MagiDiT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    _check_layout(files, expected, path)
    for shard, keys in files.items():
        part = {}
        with safe_open(shard, "pt", device="cpu") as f:
            for key in keys:
                target = _target_dtype(key, model_dtypes[key], dtype)
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


def write_tiny_checkpoint(cfg: DiTConfig, out_dir: Path, seed: int = 0, num_shards: int = 2) -> None:
    """Write deterministic random DiT weights (:func:`init_tiny_weights`) in the official
    layout: ``model.safetensors.index.json`` + ``model-0000i-of-0000N.safetensors``.

    Raises:
        ValueError: ``num_shards < 2`` (the layout is meant to exercise sharded loading).
    """
    if num_shards < 2:
        raise ValueError(f"num_shards must be >= 2, got {num_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = MagiDiT(cfg)
    init_tiny_weights(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
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
