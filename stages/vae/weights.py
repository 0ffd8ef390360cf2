"""VAE checkpoints: strict loading and deterministic tiny checkpoints.

Folder layout (the reference's diffusers-style VAE folder, ``ckpt/vae``):

* ``config.json``: ``{"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": {...}}``;
* ``diffusion_pytorch_model.safetensors`` (or a ``.safetensors.index.json`` with shards),
  keys ``encoder.*`` / ``decoder.*`` exactly as the reference ``ViTVAE.state_dict()``.

A single ``.safetensors`` file (e.g. the golden ``tiny_vae.safetensors``) is accepted too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stages.config import VaeConfig
from stages.vae.model import MagiVAE

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SCALE_FACTOR_KEY = "scale_factor"  # not a ddconfig field: stored beside it for our own loaders


def _weight_files(ckpt: Path) -> list[Path]:
    if ckpt.is_file():
        if ckpt.suffix != ".safetensors":
            raise ValueError(f"ckpt_dir: {ckpt} is a file but not a .safetensors file")
        return [ckpt]
    if not ckpt.is_dir():
        raise FileNotFoundError(f"ckpt_dir: {ckpt} does not exist")
    if (ckpt / WEIGHTS_NAME).is_file():
        return [ckpt / WEIGHTS_NAME]
    if (ckpt / INDEX_NAME).is_file():
        weight_map = json.loads((ckpt / INDEX_NAME).read_text())["weight_map"]
        return [ckpt / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"ckpt_dir: {ckpt} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def check_config(ckpt_dir: Path, cfg: VaeConfig) -> None:
    """Compare the folder's ``config.json`` ddconfig (and scale_factor) with ``cfg``; no file: no check.

    Raises:
        ValueError: naming every ddconfig field whose value differs from ``cfg``.
    """
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    if data.get("model_type", "vit") != "vit":
        raise ValueError(f"{path}: model_type {data['model_type']!r} is not supported (only 'vit')")
    ddconfig = data.get("ddconfig", {})
    ours = cfg.model_dump()
    if SCALE_FACTOR_KEY in data:
        ddconfig = {**ddconfig, SCALE_FACTOR_KEY: data[SCALE_FACTOR_KEY]}
    bad = [f"{k}: checkpoint {v!r} != config {ours[k]!r}" for k, v in ddconfig.items()
           if k in ours and ours[k] != v]
    if bad:
        raise ValueError(f"{path} does not match the VaeConfig: " + "; ".join(bad))


def read_state_dict(ckpt_dir: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a VAE checkpoint folder or single ``.safetensors`` file."""
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(ckpt_dir)):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict layout check.

    Raises:
        ValueError: listing every missing key, unexpected key and wrong shape.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} != model {shape}"
             for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes [{'; '.join(wrong)}]")
    if problems:
        raise ValueError("VAE checkpoint does not match the model: " + ", ".join(problems))


def load_vae(ckpt_dir: Path, cfg: VaeConfig, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> MagiVAE:
    """Build :class:`MagiVAE` on the meta device and assign the checkpoint's tensors.

    Args:
        ckpt_dir: VAE folder (module docstring) or one ``.safetensors`` file.
        cfg: the architecture; must agree with the folder's ``config.json`` if any.
        device: where the weights go; dtype: their dtype (floating tensors).
    Returns:
        the model in eval mode, parameters without grad.
    Raises:
        FileNotFoundError: no checkpoint at ``ckpt_dir``.
        ValueError: config mismatch, or missing / unexpected / wrong-shape keys (all named).
    """
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        check_config(ckpt_dir, cfg)
    with torch.device("meta"):
        model = MagiVAE(cfg)
    state = read_state_dict(ckpt_dir, device)
    check_state_dict(model, state)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def init_tiny_weights(cfg: VaeConfig, seed: int = 0) -> MagiVAE:
    """Deterministic non-degenerate weights (golden recipe, ``tiny_vae_config.json`` ``weight_init``).

    ``torch.manual_seed(seed)``; reference constructor init; then in
    ``named_parameters`` order: pos_embed / cls_token ~ N(0, 0.5^2); LayerNorm
    weight 1 + N(0, 0.1^2), bias N(0, 0.05^2); every other bias N(0, 0.02^2).
    With the golden ddconfig and seed 0 this reproduces ``tiny_vae.safetensors``
    bit for bit. The global RNG state is restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MagiVAE(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                is_norm = ".norm" in name or ".final_norm" in name
                if leaf in ("pos_embed", "cls_token"):
                    p.copy_(torch.randn_like(p) * 0.5)
                elif is_norm and leaf == "weight":
                    p.copy_(1 + torch.randn_like(p) * 0.1)
                elif is_norm and leaf == "bias":
                    p.copy_(torch.randn_like(p) * 0.05)
                elif leaf == "bias":
                    p.copy_(torch.randn_like(p) * 0.02)
    return model.eval().requires_grad_(False)


def save_checkpoint(model: MagiVAE, out_dir: Path) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (atomic renames)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ddconfig = model.cfg.model_dump(exclude={SCALE_FACTOR_KEY})
    config = {"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": ddconfig,
              SCALE_FACTOR_KEY: model.cfg.scale_factor}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_weights = out_dir / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out_dir / WEIGHTS_NAME)
    tmp_config = out_dir / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    tmp_config.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(tmp_config, out_dir / CONFIG_NAME)


def write_tiny_checkpoint(cfg: VaeConfig, out_dir: Path, seed: int = 0) -> None:
    """Write a deterministic checkpoint folder for ``cfg`` (see :func:`init_tiny_weights`)."""
    save_checkpoint(init_tiny_weights(cfg, seed), Path(out_dir))
