"""Flash varlen attention against SDPA on CUDA (``gpu`` marker; skipped without a GPU).

Both backends run the engine-shaped packed specs (3 jobs' windows, guidance branches, the text
branch's two-piece keys, per-chunk and per-window caption cross-attention, empty captions) in
bf16 and fp16, and the tiny DiT's packed forward runs with each backend.

Tolerances: both backends are compared to float32 dense attention of the same (rounded) inputs
and to each other. Outputs are convex combinations of N(0, 1) values (|out| < ~3); one rounding
of the output is 2**-9 relative in bf16 and 2**-11 in fp16, plus the kernels' different
reduction orders and P rounded to bf16/fp16 before P V: atol 2e-2 (bf16) / 5e-3 (fp16), rtol
the same.
"""

from __future__ import annotations

import pytest
import torch

from stages.dit.attention import SdpaRangeAttention
from stages.dit.flash_attention import FUSED_KERNELS, FlashRangeAttention, kernel_unavailable, make_attention
from tests.model.attention_specs import dense_attention, engine_specs, engine_windows, random_qkv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}


def _kernel(name: str) -> str:
    reason = kernel_unavailable(name, "cuda")
    if reason is not None:
        pytest.skip(f"varlen kernel {name}: {reason}")
    return name


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cross_per_chunk", [True, False])
def test_flash_varlen_agrees_with_sdpa_on_engine_specs(kernel, dtype, cross_per_chunk):
    flash, sdpa = FlashRangeAttention(_kernel(kernel)), SdpaRangeAttention()
    self_spec, cross_spec = engine_specs(cross_per_chunk, empty_caption=True)
    for spec, heads, groups in ((self_spec, 8, 2), (cross_spec, 8, 8)):
        q, k, v = random_qkv(spec, heads=heads, groups=groups, head_dim=128, dtype=dtype, device="cuda")
        got = flash.attend(q, k, v, flash.prepare(spec, "cuda"))
        want = sdpa.attend(q, k, v, sdpa.prepare(spec, "cuda"))
        ref = dense_attention(q, k, v, spec)
        assert got.dtype == dtype and got.is_cuda
        torch.testing.assert_close(got.float(), ref, **TOL[dtype])
        torch.testing.assert_close(want.float(), ref, **TOL[dtype])
        torch.testing.assert_close(got, want, **TOL[dtype])
        unseen = ref.abs().amax(dim=(1, 2)) == 0
        assert torch.equal(got[unseen], torch.zeros_like(got[unseen]))
    assert unseen.sum() == 32  # the two chunks with an empty caption


def test_auto_selects_flash_on_cuda():
    backend = make_attention("auto", "cuda")
    if all(kernel_unavailable(k, "cuda") for k in FUSED_KERNELS):
        assert isinstance(backend, SdpaRangeAttention)
        with pytest.raises(RuntimeError, match="attention backend 'flash' cannot run"):
            make_attention("flash", "cuda")
    else:
        assert isinstance(backend, FlashRangeAttention)
        assert backend.kernel == next(k for k in FUSED_KERNELS if kernel_unavailable(k, "cuda") is None)


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
def test_tiny_dit_forward_packed_with_flash_matches_sdpa(kernel, tmp_path):
    from stages.config import magi_tiny
    from stages.dit.packed import DenseKV
    from stages.dit.weights import load_dit, write_tiny_checkpoint

    flash = FlashRangeAttention(_kernel(kernel))
    cfg = magi_tiny().dit
    write_tiny_checkpoint(cfg, tmp_path, seed=0)
    windows, _, kv_tokens = engine_windows(length=cfg.caption_max_length)
    g = torch.Generator().manual_seed(0)
    for w in windows:
        w.x = torch.randn(w.x.shape, generator=g)
        w.y = torch.randn(w.k, cfg.caption_max_length, cfg.caption_channels, generator=g)
    heads = cfg.num_query_groups, cfg.kv_channels
    history = [tuple(torch.randn(kv_tokens, *heads, generator=g) for _ in range(2)) for _ in range(cfg.num_layers)]

    def run(dtype, backend):
        model = load_dit(tmp_path, cfg, device="cuda", dtype=dtype).eval()
        model.attention = backend
        kv = DenseKV(cfg.num_layers, kv_tokens, *heads, dtype, "cuda", history)
        with torch.no_grad():
            return [v.float().cpu() for v in model.forward_packed(windows, kv)]

    ref = run(torch.float32, SdpaRangeAttention())
    want, got = run(torch.bfloat16, SdpaRangeAttention()), run(torch.bfloat16, flash)
    # Measured on CPU (same weights and windows): |v| up to 3.3, bf16 vs float32 differs by at
    # most 0.033 (mean 0.0055). Flash must be as close to float32 as SDPA is.
    for a, b, r in zip(got, want, ref):
        torch.testing.assert_close(a, r, atol=6e-2, rtol=5e-2)
        torch.testing.assert_close(b, r, atol=6e-2, rtol=5e-2)
        assert (a - r).abs().mean() <= 1.25 * (b - r).abs().mean() + 1e-3
