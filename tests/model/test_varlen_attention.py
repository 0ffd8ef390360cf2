"""The flash-attn varlen backend's device-independent parts: RangeSpec -> cu_seqlens / gather
indices, the packed computation (per-sequence SDPA kernel, the CPU twin of the fused kernels)
against dense masked attention, and the backend selection with its errors."""

from __future__ import annotations

import logging

import pytest
import torch

from stages.dit.attention import RangeSpec, SdpaRangeAttention
from stages.dit.flash_attention import FlashRangeAttention, default_backend, kernel_unavailable, make_attention
from stages.dit.varlen_plan import varlen_plan
from tests.model.attention_specs import dense_attention, engine_specs, random_qkv

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU selection")


def test_plan_of_in_place_two_piece_and_masked_groups():
    spec = RangeSpec.from_rows([
        (0, 10, 5, 20, 0),                      # one chunk over one slice
        (10, 20, 5, 15, 1), (10, 20, 40, 50, 1),  # text branch: [ring | own window]
        (20, 30, 50, 60, 2), (30, 40, 50, 55, 2),  # one group, two query ranges with different keys
    ], sq=40, sk=64)
    plan = varlen_plan(spec)
    assert plan.q_spans == ((0, 10), (10, 20), (20, 30), (30, 40))
    assert plan.k_pieces == (((5, 20),), ((5, 15), (40, 50)), ((50, 60),), ((50, 55),))
    assert plan.cu_seqlens_q.dtype == plan.cu_seqlens_k.dtype == torch.int32
    assert plan.cu_seqlens_q.tolist() == [0, 10, 20, 30, 40] and plan.cu_seqlens_k.tolist() == [0, 15, 35, 45, 50]
    assert (plan.max_seqlen_q, plan.max_seqlen_k) == (10, 20)
    assert plan.q_index is None and plan.k_span is None
    want = [*range(5, 20), *range(5, 15), *range(40, 50), *range(50, 60), *range(50, 55)]
    assert plan.k_index.tolist() == want


def test_plan_reads_consecutive_keys_in_place():
    # each chunk over its own caption tokens, one group per chunk or one per window
    for groups in ((0, 1, 2), (0, 0, 0)):
        rows = [(0, 8, 0, 3, groups[0]), (8, 16, 3, 10, groups[1]), (16, 24, 10, 12, groups[2])]
        plan = varlen_plan(RangeSpec.from_rows(rows, sq=24, sk=12))
        assert plan.k_span == (0, 12) and plan.k_index is None and plan.q_index is None
        assert plan.cu_seqlens_q.tolist() == [0, 8, 16, 24] and plan.cu_seqlens_k.tolist() == [0, 3, 10, 12]
    # rows of one query range are a union: overlapping and adjacent key ranges merge
    plan = varlen_plan(RangeSpec.from_rows([(0, 4, 2, 6, 0), (0, 4, 5, 9, 0), (0, 4, 9, 10, 0)], sq=4, sk=10))
    assert plan.k_pieces == (((2, 10),),) and plan.k_span == (2, 10)


def test_plan_leaves_out_queries_without_keys():
    rows = [(0, 4, 0, 2, 0), (4, 8, 2, 2, 1), (12, 16, 0, 4, 2), (12, 14, 6, 8, 2)]
    plan = varlen_plan(RangeSpec.from_rows(rows, sq=16, sk=8))
    # queries 4..12 see nothing (an empty caption; no row); 12..14 and 14..16 see different keys
    assert plan.q_spans == ((0, 4), (12, 14), (14, 16))
    assert plan.k_pieces == (((0, 2),), ((0, 4), (6, 8)), ((0, 4),))
    assert plan.q_index.tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    empty = varlen_plan(RangeSpec.from_rows([(0, 4, 3, 3, 0)], sq=4, sk=8))
    assert empty.num_seqs == 0 and empty.cu_seqlens_q.tolist() == [0] and empty.max_seqlen_k == 0


def test_groups_sharing_queries_are_rejected():
    spec = RangeSpec.from_rows([(0, 8, 0, 4, 0), (6, 10, 0, 4, 1)], sq=10, sk=4)
    with pytest.raises(ValueError, match="groups 0 and 1 share queries \\[6, 8\\)"):
        varlen_plan(spec)


@pytest.mark.parametrize("cross_per_chunk", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_specs_match_dense_and_sdpa(cross_per_chunk, dtype):
    self_spec, cross_spec = engine_specs(cross_per_chunk, empty_caption=True)
    flash, sdpa = FlashRangeAttention("sdpa"), SdpaRangeAttention()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for spec in (self_spec, cross_spec):
        q, k, v = random_qkv(spec, heads=4, groups=2, head_dim=32, dtype=dtype)
        got = flash.attend(q, k, v, flash.prepare(spec))
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), dense_attention(q, k, v, spec), **tol)
        torch.testing.assert_close(got, sdpa.attend(q, k, v, sdpa.prepare(spec)), **tol)
    # the chunks with an empty caption get exact zeros from cross-attention
    unseen = ~torch.zeros(cross_spec.sq, dtype=torch.bool).index_fill_(0, varlen_plan(cross_spec).q_index, True)
    assert unseen.sum() == 32 and got[unseen].abs().max() == 0 and got[~unseen].abs().amax(dim=(1, 2)).min() > 0


def test_one_shot_form_and_bad_inputs():
    spec = RangeSpec.from_rows([(0, 6, 0, 4, 0), (6, 10, 2, 8, 0)], sq=10, sk=8)
    q, k, v = random_qkv(spec, heads=6, groups=3, head_dim=16)
    flash = FlashRangeAttention("sdpa")
    torch.testing.assert_close(flash(q, k, v, spec.q_ranges, spec.k_ranges), dense_attention(q, k, v, spec))
    prepared = flash.prepare(spec)
    with pytest.raises(ValueError, match="not a multiple of kv groups"):
        flash.attend(q[:, :5], k, v, prepared)
    with pytest.raises(ValueError, match="prepared for 10 queries over 8 keys"):
        flash.attend(q[:9], k, v, prepared)
    with pytest.raises(ValueError, match="dtypes differ"):
        flash.attend(q, k.half(), v, prepared)
    with pytest.raises(ValueError, match="varlen kernel must be one of"):
        FlashRangeAttention("xformers")


def test_fused_kernel_falls_back_to_per_sequence_sdpa_off_cuda(caplog):
    spec = RangeSpec.from_rows([(0, 6, 0, 4, 0)], sq=6, sk=4)
    q, k, v = random_qkv(spec, heads=2, groups=1, head_dim=16)
    flash = FlashRangeAttention("torch")
    with caplog.at_level(logging.WARNING, logger="stages.dit.flash_attention"):
        out = flash.attend(q, k, v, flash.prepare(spec))
        flash.attend(q, k, v, flash.prepare(spec))
    torch.testing.assert_close(out, dense_attention(q, k, v, spec))
    assert caplog.text.count("using the per-sequence SDPA kernel") == 1


def test_forward_packed_with_the_varlen_backend_matches_sdpa(tmp_path):
    """The tiny DiT's packed forward (windows of 3 jobs, guidance branches) with either backend."""
    from stages.config import magi_tiny
    from stages.dit.packed import DenseKV
    from stages.dit.weights import load_dit, write_tiny_checkpoint
    from tests.model.attention_specs import engine_windows

    cfg = magi_tiny().dit
    write_tiny_checkpoint(cfg, tmp_path, seed=0)
    model = load_dit(tmp_path, cfg).eval()
    windows, _, kv_tokens = engine_windows(length=cfg.caption_max_length)
    g = torch.Generator().manual_seed(0)
    for w in windows:
        w.x = torch.randn(w.x.shape, generator=g)
        w.y = torch.randn(w.k, cfg.caption_max_length, cfg.caption_channels, generator=g)
    history = [tuple(torch.randn(kv_tokens, 2, 64, generator=g) for _ in range(2)) for _ in range(cfg.num_layers)]

    def run(backend):
        model.attention = backend
        kv = DenseKV(cfg.num_layers, kv_tokens, 2, 64, torch.float32, "cpu", history)
        with torch.no_grad():
            return model.forward_packed(windows, kv)

    want, got = run(SdpaRangeAttention()), run(FlashRangeAttention("sdpa"))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_no_cuda
def test_selection_on_cpu(caplog):
    with caplog.at_level(logging.INFO, logger="stages.dit.flash_attention"):
        assert isinstance(make_attention("auto", "cpu"), SdpaRangeAttention)
        assert isinstance(make_attention("sdpa", "cpu"), SdpaRangeAttention)
    assert "attention backend: sdpa (no flash varlen kernel: torch: needs a CUDA device, got cpu" in caplog.text
    assert "attention backend: sdpa (requested)" in caplog.text
    assert isinstance(default_backend(), SdpaRangeAttention) and isinstance(default_backend("cpu"), SdpaRangeAttention)
    with pytest.raises(RuntimeError, match="attention backend 'flash' cannot run on device cpu: torch: needs a CUDA"):
        make_attention("flash", "cpu")
    with pytest.raises(RuntimeError, match="flash_attn: CUDA is not available"):
        make_attention("flash", "cuda")
    with pytest.raises(ValueError, match="attention backend must be one of \\('auto', 'sdpa', 'flash'\\), got 'magi'"):
        make_attention("magi", "cpu")
    with pytest.raises(ValueError, match="varlen kernel must be one of"):
        kernel_unavailable("sdpa", "cuda")
