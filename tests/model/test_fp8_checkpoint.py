"""FP8 (SmoothQuant e4m3) checkpoints: tiny fp8 layout, loading, dequantized CPU path, reference arithmetic."""

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
from stages.dit.window_forward import DiTInput

FLOAT_CFG = magi_tiny().dit.model_copy(update={"num_layers": 3})
FP8_CFG = FLOAT_CFG.model_copy(update={"fp8_quant": True})


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("dit_fp8")
    write_tiny_checkpoint(FLOAT_CFG, out, seed=4, fp8=True)
    return out


def _input(k: int = 2, seed: int = 0) -> DiTInput:
    g = torch.Generator().manual_seed(seed)
    length, tpc = FLOAT_CFG.caption_max_length, 2 * 8 * 8
    mask = torch.zeros(k, length, dtype=torch.int64)
    mask[:, :9] = 1
    return DiTInput(
        x=torch.randn(16, 2 * k, 16, 16, generator=g), t=torch.linspace(0.2, 0.8, k),
        y=torch.randn(k, length, FLOAT_CFG.caption_channels, generator=g), y_mask=mask,
        kv_range=torch.tensor([[0, (i + 1) * tpc] for i in range(k)]), caption_dropout=torch.zeros(k, dtype=torch.bool),
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
    a, b = fp8_model(inp).velocity, float_model(inp).velocity
    print(f"fp8 (dequant) vs dequantized float model: max abs diff {(a - b).abs().max().item():.3e}")
    assert torch.equal(a, b)
    original = MagiDiT(FLOAT_CFG).eval()
    original.load_state_dict(tiny_state_dict(FLOAT_CFG, seed=4))
    ref = original(inp).velocity
    assert 1e-4 < _rel(a, ref) < 0.1  # e4m3 weight rounding only
    set_fp8_mode(fp8_model, "emulate")
    emu = fp8_model(inp).velocity
    assert 1e-4 < _rel(emu, ref) < 0.15 and _rel(emu, a) > 1e-4  # activations are rounded too
    set_fp8_mode(fp8_model, "scaled_mm")  # torch._scaled_mm also runs on CPU: same arithmetic as "emulate"
    torch.testing.assert_close(fp8_model(inp).velocity, emu, atol=1e-4, rtol=1e-4)


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
    run, out = engine.start(job), []
    while not run.done:
        out += [e.latent for e in run.step() if isinstance(e, LatentChunk)]
    assert len(out) == 1 and torch.isfinite(out[0]).all() and out[0].std() > 0.05
