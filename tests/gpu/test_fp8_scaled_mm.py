"""FP8 linears on fp8 tensor cores (``torch._scaled_mm``, Ada / Hopper): ``gpu`` marker.

Skipped without a CUDA GPU of compute capability >= 8.9. The scaled-matmul path must compute
the reference arithmetic (``div_clamp_to`` + ``bmm_fp8``), i.e. equal the float32 emulation.
"""

from __future__ import annotations

import pytest
import torch

from stages.config import magi_tiny
from stages.dit.fp8 import PER_CHANNEL, PER_TENSOR, FP8, QuantizedFp8Linear, scaled_mm_supported, set_fp8_mode
from stages.dit.weights import load_dit, write_tiny_checkpoint
from tests.model.dit_fixtures import forward_window

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and scaled_mm_supported("cuda")),
                       reason="needs a CUDA GPU with compute capability >= 8.9 (fp8 tensor cores)"),
]


@pytest.mark.parametrize("kind", [PER_TENSOR, PER_CHANNEL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_linear_equals_emulation(kind, dtype):
    g = torch.Generator().manual_seed(0)
    lin = QuantizedFp8Linear(256, 128, kind)
    lin.weight.data = (torch.randn(1, 128, 256, generator=g) * 40).to(FP8)
    lin.weight_scale.data = torch.tensor([0.002])
    if kind == PER_TENSOR:
        lin.input_scale.data = torch.full((256,), 0.02)
    else:
        lin.input_scale.data = torch.tensor([0.02])
        lin.smooth_scale.data = torch.rand(1, 256, generator=g) * 0.02 + 0.01
    lin = lin.cuda()
    x = (torch.randn(37, 256, generator=g) * 2).to("cuda", dtype)  # 37 rows: exercises the padding to 16
    assert lin.resolved_mode(x) == "scaled_mm"
    fast = lin(x)
    lin.mode = "emulate"
    slow = lin(x)
    assert fast.dtype == dtype and fast.shape == (37, 128)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fast.float(), slow.float(), atol=tol * slow.abs().max().item(), rtol=tol)


@torch.no_grad()
def test_tiny_fp8_dit_on_gpu_matches_cpu_emulation(tmp_path):
    cfg = magi_tiny().dit.model_copy(update={"num_layers": 3, "fp8_quant": True})
    write_tiny_checkpoint(cfg, tmp_path, seed=4)
    g = torch.Generator().manual_seed(0)
    k, length = 2, cfg.caption_max_length
    mask = torch.zeros(k, length, dtype=torch.int64)
    mask[:, :9] = 1
    inp = dict(x=torch.randn(16, 4, 16, 16, generator=g), t=torch.tensor([0.3, 0.7]),
               y=torch.randn(k, length, cfg.caption_channels, generator=g), y_mask=mask,
               kv_range=torch.tensor([[0, 128], [0, 256]]))
    on_gpu = lambda d: {n: v.cuda() for n, v in d.items()}  # noqa: E731
    cpu = load_dit(tmp_path, cfg)
    set_fp8_mode(cpu, "emulate")
    want = forward_window(cpu, **inp)
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = load_dit(tmp_path, cfg, device="cuda")  # "auto" -> scaled_mm on this device
    got = forward_window(gpu, **on_gpu(inp)).cpu()
    rel = ((got - want).norm() / want.norm()).item()
    print(f"tiny fp8 DiT, torch._scaled_mm on GPU vs CPU emulation: relative L2 {rel:.2e}")
    assert rel < 1e-2  # fp8 activation rounding can flip where upstream float sums differ in the last bit
    bf16 = load_dit(tmp_path, cfg, device="cuda", dtype=torch.bfloat16)
    rel_bf16 = ((forward_window(bf16, **on_gpu(inp)).float().cpu() - want).norm() / want.norm()).item()
    assert rel_bf16 < 0.05
