"""Convert DiT state dicts between the float layout and the fp8 (SmoothQuant e4m3) layout.

* :func:`quantize_state_dict`: float layout -> the reference ``distill_quant`` layout (used to
  write tiny fp8 checkpoints; the official fp8 weights come from the reference's own
  calibration, which is not public, so the scales here follow SmoothQuant with assumed
  activation ranges: Xiao et al. 2023, "SmoothQuant", migration strength 0.5).
* :func:`dequantize_state_dict`: fp8 layout -> float layout with ``W = W_q * alpha / d``
  (:func:`stages.dit.fp8.dequantize_weight`), loadable into a ``fp8_quant=False`` model.

Which linears are quantized and their scale tensors: :mod:`stages.dit.fp8`.
"""

from __future__ import annotations

import torch

from stages.config import DiTConfig
from stages.dit.fp8 import FP8, FP8_MAX, PER_CHANNEL, PER_TENSOR, dequantize_weight, is_quantized_layer

QUANTIZED_LINEARS = {
    "self_attention.linear_qkv.q": PER_TENSOR,
    "self_attention.linear_qkv.qx": PER_TENSOR,
    "self_attention.linear_qkv.k": PER_TENSOR,
    "self_attention.linear_qkv.v": PER_TENSOR,
    "self_attention.linear_proj": PER_CHANNEL,
    "mlp.linear_fc1": PER_TENSOR,
    "mlp.linear_fc2": PER_CHANNEL,
}


def quantized_prefixes(cfg: DiTConfig) -> dict[str, str]:
    """state_dict prefix -> kind of every fp8 linear of ``cfg`` (empty unless ``cfg.fp8_quant``)."""
    return {
        f"videodit_blocks.layers.{n}.{name}": kind
        for n in range(cfg.num_layers)
        if is_quantized_layer(n, cfg.num_layers, cfg.fp8_quant)
        for name, kind in QUANTIZED_LINEARS.items()
    }


def _quantize(w: torch.Tensor, kind: str, act_amax: float) -> dict[str, torch.Tensor]:
    w = w.float()
    s_act = act_amax / FP8_MAX
    if kind == PER_TENSOR:
        col = torch.ones(w.shape[1])
        input_scale = torch.full((w.shape[1],), s_act)
        extra = {}
    else:  # SmoothQuant: move sqrt of the per-input-channel weight range into the activation divisor
        amax = w.abs().amax(dim=0).clamp_min(1e-8)
        col = (amax.mean() / amax).sqrt()
        input_scale = torch.tensor([s_act])
        extra = {"smooth_scale": (s_act * col)[None, :].contiguous()}
    scaled = w * col[None, :]
    weight_scale = (scaled.abs().amax().clamp_min(1e-12) / FP8_MAX).reshape(1)
    w_q = (scaled / weight_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)[None].contiguous()
    return {"weight": w_q, "weight_scale": weight_scale, "input_scale": input_scale, **extra}


def quantize_state_dict(state: dict[str, torch.Tensor], cfg: DiTConfig, act_amax: float = 8.0) -> dict[str, torch.Tensor]:
    """Float-layout state dict -> fp8 layout for ``cfg`` (``cfg.fp8_quant`` must be set).

    Per-tensor linears: ``input_scale = act_amax / 448`` for every channel, ``weight_scale =
    amax|W| / 448``. Per-channel linears: smoothing ``c_i = sqrt(mean_j a_j / a_i)`` with
    ``a_i = amax|W[:, i]|``, ``smooth_scale = input_scale * c``, weights ``W * c`` quantized with
    ``weight_scale = amax|W c| / 448``. Either way ``W_q * alpha / d`` reproduces W up to e4m3
    rounding. Keys keep the reference order (weight, weight_scale, input_scale, smooth_scale).

    Raises:
        ValueError: ``cfg.fp8_quant`` is False; KeyError: a linear's float weight is missing.
    """
    if not cfg.fp8_quant:
        raise ValueError("quantize_state_dict needs a config with fp8_quant=True")
    prefixes = quantized_prefixes(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = key[: -len(".weight")] if key.endswith(".weight") else None
        if prefix in prefixes:
            for name, tensor in _quantize(value, prefixes[prefix], act_amax).items():
                out[f"{prefix}.{name}"] = tensor
        else:
            out[key] = value
    return out


def dequantize_state_dict(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """fp8-layout state dict of ``cfg`` -> float layout (float32 ``(out, in)`` weights, scales dropped).

    Raises:
        KeyError: a scale tensor of an fp8 linear is missing.
    """
    prefixes = quantized_prefixes(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in prefixes:
            out[key] = value
        elif leaf == "weight":
            smooth = state[f"{prefix}.smooth_scale"] if prefixes[prefix] == PER_CHANNEL else None
            out[key] = dequantize_weight(value, state[f"{prefix}.weight_scale"], state[f"{prefix}.input_scale"], smooth)
    return out
