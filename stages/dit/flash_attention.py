"""Flash-attention variable-length backend of :class:`~stages.dit.attention.RangeAttention`.

``prepare`` turns a :class:`~stages.dit.attention.RangeSpec` into varlen sequences once per
forward (:func:`stages.dit.varlen_plan.varlen_plan`: ``cu_seqlens_q``/``cu_seqlens_k`` int32
on the device, ``max_seqlen_q``/``max_seqlen_k``, the gather indices); ``attend`` packs q, K
and V (a slice or one ``index_select`` each), makes one kernel call over every sequence of the
forward (all jobs' windows and guidance branches) and scatters the result back. Grouped-query
attention is native (fewer K/V heads, query head ``h`` reads K/V head ``h // (Hq // G)``);
softmax scale ``1/sqrt(Dh)``; not causal (reference ``flash_attn_varlen_func`` calls in
``FullyParallelAttention.core_attention``).

Kernels (``kernel=``), imported lazily:

* ``"torch"``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's built-in FlashAttention-2
  varlen, torch >= 2.10; needs a CUDA build with flash attention, sm80+). First choice.
* ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` from the flash-attn package.
* ``"sdpa"``: one ``scaled_dot_product_attention`` per sequence; the same packing on any
  device (the CPU twin the tests run), and the fallback of the fused kernels for inputs they
  do not take (float32, head dim not a multiple of 8 or above 256).

:func:`make_attention` picks the backend: ``"flash"`` on CUDA when a fused kernel is usable,
SDPA (:class:`~stages.dit.attention.SdpaRangeAttention`) elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from stages.dit.attention import RangeAttention, RangeAttentionBase, RangeSpec, SdpaRangeAttention
from stages.dit.varlen_plan import VarlenPlan, varlen_plan

log = logging.getLogger(__name__)

AttentionName = Literal["auto", "sdpa", "flash"]
ATTENTION_NAMES = ("auto", "sdpa", "flash")
FUSED_KERNELS = ("torch", "flash_attn")
FUSED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class VarlenPrepared:
    """A :class:`VarlenPlan` with its index tensors on the device (``None`` where not needed)."""

    plan: VarlenPlan
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    q_index: torch.Tensor | None
    k_index: torch.Tensor | None


def kernel_unavailable(kernel: str, device: torch.device | str | None) -> str | None:
    """Why fused ``kernel`` cannot run on ``device`` (None when it can).

    Raises:
        ValueError: ``kernel`` is not one of :data:`FUSED_KERNELS`.
    """
    if kernel not in FUSED_KERNELS:
        raise ValueError(f"varlen kernel must be one of {FUSED_KERNELS}, got {kernel!r}")
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return f"needs a CUDA device, got {dev}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return f"needs compute capability >= 8.0, device has {torch.cuda.get_device_capability(dev)}"
    if kernel == "torch":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        if not torch.backends.cuda.is_flash_attention_available():
            return "this torch build has no flash attention kernels"
        return None
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    return None


def _torch_varlen(q, k, v, p: VarlenPrepared, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, p.cu_seqlens_q, p.cu_seqlens_k, p.plan.max_seqlen_q, p.plan.max_seqlen_k,
                       scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _flash_attn_varlen(q, k, v, p: VarlenPrepared, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, p.cu_seqlens_q, p.cu_seqlens_k, p.plan.max_seqlen_q,
                                  p.plan.max_seqlen_k, dropout_p=0.0, softmax_scale=scale, causal=False)


def _sdpa_varlen(q, k, v, p: VarlenPrepared, scale: float) -> torch.Tensor:
    """The varlen contract with one SDPA call per sequence (any device and dtype)."""
    out = torch.empty_like(q)
    gqa = k.shape[1] != q.shape[1]
    q0 = k0 = 0
    for (a, b), pieces in zip(p.plan.q_spans, p.plan.k_pieces):
        q1, k1 = q0 + b - a, k0 + sum(e - s for s, e in pieces)
        res = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1).unsqueeze(0), k[k0:k1].transpose(0, 1).unsqueeze(0),
            v[k0:k1].transpose(0, 1).unsqueeze(0), scale=scale, enable_gqa=gqa,
        )
        out[q0:q1] = res[0].transpose(0, 1)
        q0, k0 = q1, k1
    return out


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "torch": _torch_varlen, "flash_attn": _flash_attn_varlen, "sdpa": _sdpa_varlen,
}


class FlashRangeAttention(RangeAttentionBase):
    """:class:`RangeAttention` through one varlen kernel call per layer (see module docstring).

    Args:
        kernel: ``"torch"``, ``"flash_attn"`` or ``"sdpa"`` (see module docstring). The fused
            kernels are only called on CUDA fp16/bf16 inputs with head dim a multiple of 8 up to
            256; other inputs take the ``"sdpa"`` kernel (logged once).

    Raises:
        ValueError: unknown ``kernel``.
    """

    def __init__(self, kernel: str = "torch"):
        if kernel not in _KERNELS:
            raise ValueError(f"varlen kernel must be one of {tuple(_KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        self._warned: set[str] = set()

    def prepare(self, spec: RangeSpec, device=None) -> VarlenPrepared:
        """Varlen plan of ``spec`` with cu_seqlens (int32) and gather indices on ``device``.

        Raises:
            ValueError: see :func:`varlen_plan`.
        """
        plan = varlen_plan(spec)

        def dev(t):
            return None if t is None else t.to(device) if device is not None else t

        return VarlenPrepared(plan, dev(plan.cu_seqlens_q), dev(plan.cu_seqlens_k), dev(plan.q_index),
                              dev(plan.k_index))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: VarlenPrepared) -> torch.Tensor:
        """(Sq, Hq, Dh) queries over the (Sk, G, Dh) key buffer -> (Sq, Hq, Dh), dtype of q.

        Raises:
            ValueError: ``Hq % G != 0``, q/k/v dtypes differ, or q / the key buffer do not have
                the token counts the spec was prepared for.
        """
        plan = prepared.plan
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"query heads {q.shape[1]} not a multiple of kv groups {k.shape[1]}")
        if q.shape[0] != plan.sq or k.shape[0] < plan.sk or v.shape[0] != k.shape[0]:
            raise ValueError(f"prepared for {plan.sq} queries over {plan.sk} keys, got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        if not q.dtype == k.dtype == v.dtype:
            raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if plan.num_seqs == 0:
            return torch.zeros_like(q)
        qq = q if prepared.q_index is None else q.index_select(0, prepared.q_index)
        if prepared.k_index is None:
            kk, vv = k[plan.k_span[0]: plan.k_span[1]], v[plan.k_span[0]: plan.k_span[1]]
        else:
            kk, vv = k.index_select(0, prepared.k_index), v.index_select(0, prepared.k_index)
        kernel = self._kernel_for(q)
        if kernel != "sdpa":
            qq, kk, vv = (t if t.stride(-1) == 1 else t.contiguous() for t in (qq, kk, vv))
        out = _KERNELS[kernel](qq, kk, vv, prepared, 1.0 / math.sqrt(q.shape[-1]))
        if prepared.q_index is None:
            return out
        return torch.zeros_like(q).index_copy_(0, prepared.q_index, out)

    def _kernel_for(self, q: torch.Tensor) -> str:
        if self.kernel == "sdpa":
            return "sdpa"
        reason = None
        if not q.is_cuda:
            reason = f"inputs on {q.device}"
        elif q.dtype not in FUSED_DTYPES:
            reason = f"dtype {q.dtype} (fused kernels take float16/bfloat16)"
        elif q.shape[-1] % 8 or q.shape[-1] > 256:
            reason = f"head dim {q.shape[-1]} (fused kernels take multiples of 8 up to 256)"
        if reason is None:
            return self.kernel
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("flash attention (%s): %s, using the per-sequence SDPA kernel", self.kernel, reason)
        return "sdpa"


def make_attention(name: str = "auto", device: torch.device | str | None = None) -> RangeAttention:
    """The attention backend ``name`` for a model on ``device`` (the selection is logged).

    ``"auto"``: :class:`FlashRangeAttention` on a CUDA device where a fused kernel is usable
    (``"torch"`` first, then ``"flash_attn"``), :class:`SdpaRangeAttention` otherwise.
    ``"sdpa"``: always SDPA. ``"flash"``: the fused varlen backend or an error.

    Raises:
        ValueError: ``name`` is not one of ``auto``, ``sdpa``, ``flash``.
        RuntimeError: ``"flash"`` but no fused kernel can run on ``device`` (the message gives
            each kernel's reason, e.g. no CUDA device or flash-attn not installed).
    """
    if name not in ATTENTION_NAMES:
        raise ValueError(f"attention backend must be one of {ATTENTION_NAMES}, got {name!r}")
    if name == "sdpa":
        log.info("attention backend: sdpa (requested)")
        return SdpaRangeAttention()
    reasons = {}
    for kernel in FUSED_KERNELS:
        reasons[kernel] = kernel_unavailable(kernel, device)
        if reasons[kernel] is None:
            log.info("attention backend: flash (varlen kernel %s) on %s", kernel, device)
            return FlashRangeAttention(kernel)
    why = "; ".join(f"{k}: {r}" for k, r in reasons.items())
    if name == "flash":
        raise RuntimeError(f"attention backend 'flash' cannot run on device {device}: {why}")
    log.info("attention backend: sdpa (no flash varlen kernel: %s)", why)
    return SdpaRangeAttention()


def default_backend(device: torch.device | str | None = None) -> RangeAttention:
    """The backend for a model on ``device``: without a device (a model built without a
    backend) SDPA; otherwise :func:`make_attention` ``("auto")``
    (flash varlen on CUDA where a kernel is usable, SDPA elsewhere)."""
    if device is None:
        return SdpaRangeAttention()
    return make_attention("auto", device)
