"""FP8 (SmoothQuant, e4m3) linears of the MAGI-1 ``distill_quant`` checkpoints.

Layout (reference ``dit_module.PerTensorQuantizedFp8Linear`` / ``PerChannelQuantizedFp8Linear``,
used when ``engine_config.fp8_quant`` for every layer except the first and the last):

* per-tensor (``linear_qkv.{q,qx,k,v}``, ``mlp.linear_fc1``): ``weight`` (1, out, in)
  float8_e4m3fn, ``weight_scale`` (1,) float32, ``input_scale`` (in,) float32;
* per-channel (``self_attention.linear_proj``, ``mlp.linear_fc2``): ``weight`` (1, out, in)
  float8_e4m3fn, ``weight_scale`` (1,), ``input_scale`` (1,), ``smooth_scale`` (1, in) float32.

Semantics (reference ``div_clamp_to`` + flashinfer ``bmm_fp8``): the activation is divided
per input channel by a divisor ``d`` (``input_scale`` for per-tensor, ``smooth_scale`` for
per-channel), clamped to the e4m3 range +-448, rounded to bfloat16 and then to e4m3; the fp8
product is scaled by ``alpha = input_scale[0] * weight_scale[0]`` (``bmm_fp8`` hands both
scale tensors to cuBLASLt as per-tensor scale pointers, which read one float each):
``y = alpha * q(x / d) @ W_q^T``. Dropping the activation rounding gives the dequantized
weight ``W[o, i] = W_q[o, i] * alpha / d[i]``.

Execution modes (:data:`MODES`, set with :func:`set_fp8_mode`):
``"dequant"`` (CPU default): ``F.linear(x, W)`` with W dequantized on the fly (no full-precision
copy is kept); ``"emulate"``: the reference arithmetic in float32 on any device;
``"scaled_mm"`` (default on CUDA with compute capability >= 8.9, Ada/Hopper):
``torch._scaled_mm`` on e4m3 operands with the same scales as ``bmm_fp8``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MODES = ("auto", "dequant", "emulate", "scaled_mm")
PER_TENSOR, PER_CHANNEL = "per_tensor", "per_channel"
SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".smooth_scale")


def quantize_activation(x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """Reference ``div_clamp_to``: ``e4m3(bf16(clamp(x / divisor, -448, 448)))``.

    Args: x (..., in) any float dtype; divisor (in,) or (1,) float32.
    Returns: (..., in) float8_e4m3fn.
    """
    return torch.clamp(x.float() / divisor.float(), -FP8_MAX, FP8_MAX).bfloat16().to(FP8)


def activation_divisor(input_scale: torch.Tensor, smooth_scale: torch.Tensor | None) -> torch.Tensor:
    """(in,) float32 divisor ``d``: ``input_scale`` (per-tensor layout) or ``smooth_scale[0]`` (per-channel)."""
    return (input_scale if smooth_scale is None else smooth_scale.reshape(-1)).float()


def output_scale(weight_scale: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """(1,) float32 ``alpha = input_scale[0] * weight_scale[0]`` (what cuBLASLt reads from the scale pointers)."""
    return (input_scale.reshape(-1)[:1].float() * weight_scale.reshape(-1)[:1].float())


def dequantize_weight(weight, weight_scale, input_scale, smooth_scale=None) -> torch.Tensor:
    """(1, out, in) e4m3 weight and its scales -> (out, in) float32 ``W_q * alpha / d``."""
    scale = output_scale(weight_scale, input_scale) / activation_divisor(input_scale, smooth_scale)
    return weight.reshape(weight.shape[-2], weight.shape[-1]).float() * scale[None, :]


def scaled_mm_supported(device: torch.device | str) -> bool:
    """True on a CUDA device with compute capability >= 8.9 (fp8 tensor cores: Ada, Hopper, later)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


class QuantizedFp8Linear(nn.Module):
    """A SmoothQuant e4m3 linear (no bias); see the module docstring for layout and math.

    Args:
        in_features, out_features: sizes.
        kind: :data:`PER_TENSOR` or :data:`PER_CHANNEL` (decides the scale tensors).

    Input (..., in) float; output (..., out) in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, kind: str):
        super().__init__()
        if kind not in (PER_TENSOR, PER_CHANNEL):
            raise ValueError(f"kind must be {PER_TENSOR!r} or {PER_CHANNEL!r}, got {kind!r}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.mode = "auto"
        f32 = torch.float32
        self.weight = nn.Parameter(torch.empty(1, out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(1, dtype=f32), requires_grad=False)
        if kind == PER_TENSOR:
            self.input_scale = nn.Parameter(torch.empty(in_features, dtype=f32), requires_grad=False)
        else:
            self.input_scale = nn.Parameter(torch.empty(1, dtype=f32), requires_grad=False)
            self.smooth_scale = nn.Parameter(torch.empty(1, in_features, dtype=f32), requires_grad=False)

    def _smooth(self) -> torch.Tensor | None:
        return None if self.kind == PER_TENSOR else self.smooth_scale

    def divisor(self) -> torch.Tensor:
        """(in,) float32 per-channel activation divisor ``d``."""
        return activation_divisor(self.input_scale, self._smooth())

    def alpha(self) -> torch.Tensor:
        """(1,) float32 output scale ``input_scale[0] * weight_scale[0]``."""
        return output_scale(self.weight_scale, self.input_scale)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) float32 ``W_q * alpha / d`` (:func:`dequantize_weight`)."""
        return dequantize_weight(self.weight, self.weight_scale, self.input_scale, self._smooth())

    def resolved_mode(self, x: torch.Tensor) -> str:
        if self.mode != "auto":
            return self.mode
        return "scaled_mm" if scaled_mm_supported(x.device) else "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.resolved_mode(x)
        if mode == "dequant":
            return F.linear(x, self.dequantized_weight().to(x.dtype))
        xq = quantize_activation(x, self.divisor())
        if mode == "emulate":
            y = (xq.float() @ self.weight[0].float().t()) * self.alpha()
            return y.to(x.dtype)
        if mode == "scaled_mm":
            return self._scaled_mm(xq, x.dtype)
        raise ValueError(f"unknown fp8 mode {mode!r}; known: {MODES}")

    def _scaled_mm(self, xq: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``torch._scaled_mm`` (cuBLASLt fp8 GEMM) with per-tensor scales, rows padded to 16."""
        lead = xq.shape[:-1]
        a = xq.reshape(-1, self.in_features)
        rows = a.shape[0]
        pad = (-rows) % 16
        if pad:
            a = torch.cat([a, a.new_zeros(pad, self.in_features)])
        one = torch.ones((), dtype=torch.float32, device=a.device)
        scale_a = self.input_scale.reshape(-1)[0].float().reshape(())
        scale_b = self.weight_scale.reshape(-1)[0].float().reshape(())
        dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        y = torch._scaled_mm(a, self.weight[0].t(), scale_a=scale_a * one, scale_b=scale_b * one, out_dtype=dtype)
        return y[:rows].reshape(*lead, self.out_features).to(out_dtype)


def is_quantized_layer(layer_number: int, num_layers: int, fp8_quant: bool) -> bool:
    """Reference rule: quantized linears in every layer but the first and the last."""
    return fp8_quant and 0 < layer_number < num_layers - 1


def make_linear(in_features: int, out_features: int, dtype: torch.dtype, *, quantized: bool, kind: str) -> nn.Module:
    """``nn.Linear(in, out, bias=False, dtype)``, or a :class:`QuantizedFp8Linear` of ``kind`` when ``quantized``."""
    if quantized:
        return QuantizedFp8Linear(in_features, out_features, kind)
    return nn.Linear(in_features, out_features, bias=False, dtype=dtype)


def set_fp8_mode(model: nn.Module, mode: str) -> int:
    """Set the execution mode (:data:`MODES`) of every fp8 linear in ``model``; returns how many.

    Raises:
        ValueError: unknown mode; "scaled_mm" on a device without fp8 tensor cores is only
            detected at the forward (torch raises there).
    """
    if mode not in MODES:
        raise ValueError(f"unknown fp8 mode {mode!r}; known: {MODES}")
    mods = [m for m in model.modules() if isinstance(m, QuantizedFp8Linear)]
    for m in mods:
        m.mode = mode
    return len(mods)


def fp8_param_keys(model: nn.Module) -> set[str]:
    """state_dict keys of every fp8 linear's tensors (their dtypes are fixed, never cast at load)."""
    keys = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedFp8Linear):
            keys.update(f"{name}.{p}" for p, _ in mod.named_parameters(recurse=False))
    return keys
