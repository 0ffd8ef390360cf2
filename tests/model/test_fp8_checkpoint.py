"""FP8 (SmoothQuant e4m3) checkpoints: tiny fp8 layout, loading, dequantized CPU path, reference arithmetic.

The fp8 GEMM paths ("emulate": float32 matmul of the e4m3 values; "scaled_mm": ``torch._scaled_mm``)
sum the same exact e4m3 products in float32 in a kernel-chosen order, so they are compared with the
float64 value of the quantized arithmetic under the float32 summation bound, never with each other
bit for bit (the order, and so the last bits, differ between CPUs and kernels).
"""

from __future__ import annotations

import pytest
import torch

from cluster.engine import Engine
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, PromptSegment
from stages.config import magi_tiny
from stages.dit.fp8 import FP8, PER_CHANNEL, PER_TENSOR, QuantizedFp8Linear, quantize_activation, set_fp8_mode
from stages.dit.fp8_convert import dequantize_state_dict, quantize_state_dict
from stages.dit.model import MagiDiT
from stages.dit.weights import load_dit, tiny_state_dict, write_tiny_checkpoint
from tests.model.dit_fixtures import forward_window

FLOAT_CFG = magi_tiny().dit.model_copy(update={"num_layers": 3})
FP8_CFG = FLOAT_CFG.model_copy(update={"fp8_quant": True})


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dit_fp8")
    write_tiny_checkpoint(FLOAT_CFG, out, seed=4, fp8=True)
    return out


def _input(k: int = 2, seed: int = 0) -> dict:
    """forward_window inputs: k chunks of 2 latent frames at 16x16, block-causal key ranges."""
    g = torch.Generator().manual_seed(seed)
    length, tpc = FLOAT_CFG.caption_max_length, 2 * 8 * 8
    mask = torch.zeros(k, length, dtype=torch.int64)
    mask[:, :9] = 1
    return dict(
        x=torch.randn(16, 2 * k, 16, 16, generator=g), t=torch.linspace(0.2, 0.8, k),
        y=torch.randn(k, length, FLOAT_CFG.caption_channels, generator=g), y_mask=mask,
        kv_range=torch.tensor([[0, (i + 1) * tpc] for i in range(k)]),
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_tiny_fp8_layout_only_in_middle_layers(fp8_ckpt):
    model = load_dit(fp8_ckpt, FP8_CFG)
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantizedFp8Linear)}
    assert {n.split(".")[2] for n in quant} == {"1"} and len(quant) == 7  # reference: not the first / last layer
    sd = model.state_dict()
    assert sd["videodit_blocks.layers.1.self_attention.linear_qkv.q.weight"].dtype == FP8
    assert sd["videodit_blocks.layers.1.self_attention.linear_qkv.q.input_scale"].shape == (256,)
    assert sd["videodit_blocks.layers.1.mlp.linear_fc2.smooth_scale"].shape == (1, 512)  # ffn_hidden_size
    assert sd["videodit_blocks.layers.0.mlp.linear_fc1.weight"].dtype == torch.float32
    low = load_dit(fp8_ckpt, FP8_CFG, dtype=torch.bfloat16).state_dict()
    assert low["videodit_blocks.layers.1.mlp.linear_fc1.weight"].dtype == FP8
    assert low["videodit_blocks.layers.1.mlp.linear_fc1.weight_scale"].dtype == torch.float32
    assert low["videodit_blocks.layers.2.mlp.linear_fc1.weight"].dtype == torch.bfloat16


@torch.no_grad()
def test_fp8_model_equals_dequantized_float_model(fp8_ckpt):
    fp8_model = load_dit(fp8_ckpt, FP8_CFG)  # CPU: the "auto" mode dequantizes
    float_model = MagiDiT(FLOAT_CFG).eval()
    float_model.load_state_dict(dequantize_state_dict(fp8_model.state_dict(), FP8_CFG))
    inp = _input()
    a, b = forward_window(fp8_model, **inp), forward_window(float_model, **inp)
    print(f"fp8 (dequant) vs dequantized float model: max abs diff {(a - b).abs().max().item():.3e}")
    assert torch.equal(a, b)  # the same float32 weights through the same kernels
    original = MagiDiT(FLOAT_CFG).eval()
    original.load_state_dict(tiny_state_dict(FLOAT_CFG, seed=4))
    ref = forward_window(original, **inp)
    assert 1e-4 < _rel(a, ref) < 0.1  # e4m3 weight rounding only
    set_fp8_mode(fp8_model, "emulate")
    emu = forward_window(fp8_model, **inp)
    assert 1e-4 < _rel(emu, ref) < 0.15 and _rel(emu, a) > 1e-4  # activations are rounded too


@torch.no_grad()
def test_scaled_mm_model_is_the_emulated_arithmetic(fp8_ckpt):
    """Model level: ``scaled_mm`` and ``emulate`` differ only by float32 summation order, whose last
    bits flip a few roundings of the next quantized linear's activations (one e4m3 step, 2^-3
    relative, of a few elements), so their distance must stay far below what rounding the
    activations at all changes (emulate vs dequant); a wrong scale, a missing activation rounding
    or a low-precision output would be of that size or larger."""
    model = load_dit(fp8_ckpt, FP8_CFG)
    inp = _input()
    outs = {}
    for mode in ("dequant", "emulate", "scaled_mm"):  # torch._scaled_mm also runs on CPU
        set_fp8_mode(model, mode)
        outs[mode] = forward_window(model, **inp)
    order, rounding = _rel(outs["scaled_mm"], outs["emulate"]), _rel(outs["emulate"], outs["dequant"])
    print(f"rel |scaled_mm - emulate| {order:.2e}, rel |emulate - dequant| {rounding:.2e}, ratio {order / rounding:.3f}")
    assert order < 0.1 * rounding


def _exact_and_bound(lin: QuantizedFp8Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 value of the reference fp8 arithmetic ``alpha * (e4m3(x / d) @ W_q^T)`` and the largest
    error of any float32 evaluation of it: the e4m3 products are exact in float32 (4 + 4 significant
    bits), a sum of n terms in any order is within gamma_n * sum|terms| (gamma_n = n u / (1 - n u),
    u = 2^-24; Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5), and the
    scaling by alpha rounds once more (u |y|)."""
    xq = quantize_activation(x, lin.divisor()).double()
    w = lin.weight[0].double()
    alpha = lin.alpha().double()
    u, n = 2.0**-24, lin.in_features
    exact = (xq @ w.t()) * alpha
    bound = (n * u / (1 - n * u)) * ((xq.abs() @ w.abs().t()) * alpha) + 2 * u * exact.abs()
    return exact, bound


@pytest.mark.parametrize("kind", [PER_TENSOR, PER_CHANNEL])
@pytest.mark.parametrize("rows", [1, 37, 300])  # 37, 300: not a multiple of the 16-row padding
def test_fp8_gemm_paths_compute_the_quantized_product(kind, rows):
    """Linear level, deterministic on every CPU: each fp8 GEMM path is within the float32 summation
    bound of the float64 quantized product; the dequantized path (activations not rounded) is not."""
    g = torch.Generator().manual_seed(rows)
    lin = QuantizedFp8Linear(512, 256, kind)
    lin.weight.data = (torch.randn(1, 256, 512, generator=g) * 50).to(FP8)
    lin.weight_scale.data = torch.tensor([0.01])
    if kind == PER_TENSOR:
        lin.input_scale.data = torch.rand(512, generator=g) * 0.02 + 0.01
    else:
        lin.input_scale.data = torch.tensor([0.03])
        lin.smooth_scale.data = torch.rand(1, 512, generator=g) * 0.02 + 0.01
    x = torch.randn(rows, 512, generator=g) * 3
    exact, bound = _exact_and_bound(lin, x)
    for mode in ("emulate", "scaled_mm"):
        lin.mode = mode
        y = lin(x)
        assert y.dtype == torch.float32 and y.shape == (rows, 256)
        err = (y.double() - exact).abs()
        print(f"{kind} rows {rows} {mode}: max error / bound {(err / bound).max().item():.3f}")
        assert bool((err <= bound).all()), f"{mode}: {int((err > bound).sum())} elements beyond the float32 bound"
    lin.mode = "dequant"
    assert bool(((lin(x).double() - exact).abs() > bound).any())  # the bound tells rounded activations apart


def test_linear_arithmetic_is_the_references():
    """y = input_scale[0] * weight_scale[0] * e4m3(bf16(clamp(x / d, +-448))) @ W_q^T, d per input channel."""
    g = torch.Generator().manual_seed(1)
    for kind in (PER_TENSOR, PER_CHANNEL):
        lin = QuantizedFp8Linear(32, 16, kind)
        lin.weight.data = (torch.randn(1, 16, 32, generator=g) * 50).to(FP8)
        lin.weight_scale.data = torch.tensor([0.01])
        if kind == PER_TENSOR:
            lin.input_scale.data = torch.rand(32, generator=g) * 0.02 + 0.01  # not constant: alpha still uses [0]
            d = lin.input_scale.data
        else:
            lin.input_scale.data = torch.tensor([0.03])
            lin.smooth_scale.data = torch.rand(1, 32, generator=g) * 0.02 + 0.01
            d = lin.smooth_scale.data[0]
        x = torch.randn(5, 32, generator=g) * 3
        x[0, 0] = 1e4  # saturates at 448
        xq = torch.clamp(x / d, -448, 448).bfloat16().to(FP8)
        assert torch.equal(quantize_activation(x, d), xq)
        want = (xq.float() @ lin.weight[0].float().t()) * (lin.input_scale.data[0] * 0.01)
        lin.mode = "emulate"
        torch.testing.assert_close(lin(x), want, atol=1e-5, rtol=1e-6)
        lin.mode = "dequant"
        w = lin.weight[0].float() * (lin.input_scale.data[0] * 0.01) / d
        torch.testing.assert_close(lin(x), x @ w.t(), atol=1e-4, rtol=1e-6)
        lin.mode = "bogus"
        with pytest.raises(ValueError, match="bogus"):
            lin(x)


def test_quantize_dequantize_keeps_weights_to_e4m3_precision():
    state = tiny_state_dict(FLOAT_CFG, seed=5)
    quant = quantize_state_dict(state, FP8_CFG)
    back = dequantize_state_dict(quant, FP8_CFG)
    assert list(back) == list(state)
    for key in ("videodit_blocks.layers.1.mlp.linear_fc2.weight", "videodit_blocks.layers.1.self_attention.linear_qkv.q.weight"):
        assert 1e-4 < _rel(back[key], state[key]) < 0.06
    assert torch.equal(back["videodit_blocks.layers.0.mlp.linear_fc2.weight"], state["videodit_blocks.layers.0.mlp.linear_fc2.weight"])
    with pytest.raises(ValueError, match="fp8_quant"):
        quantize_state_dict(state, FLOAT_CFG)


def test_engine_runs_an_fp8_checkpoint(fp8_ckpt):
    cfg = magi_tiny().model_copy(update={"dit": FP8_CFG})
    engine = Engine.from_checkpoint(cfg, fp8_ckpt)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(cfg.dit.caption_max_length, cfg.dit.caption_channels, generator=g)
    mask = torch.zeros(cfg.dit.caption_max_length, dtype=torch.int64)
    mask[:6] = 1
    spec = JobSpec(job_id="fp8", prompt_segments=(PromptSegment(0, "a"),), num_chunks=1, height=cfg.height,
                   width=cfg.width, seed=3, num_steps=4)
    job = EngineJob(spec, ((0, CaptionEmbedding(emb, mask)),))
    engine.submit(job)
    out = []
    while engine.has_work:
        out += [e.latent for e in engine.step() if isinstance(e, LatentChunk)]
    assert len(out) == 1 and torch.isfinite(out[0]).all() and out[0].std() > 0.05
