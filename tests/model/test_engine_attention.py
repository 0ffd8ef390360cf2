"""The varlen range-attention interface the engine's packed forward uses (groups over a packed
key buffer), checked against explicit masked softmax attention."""

from __future__ import annotations

import math

import pytest
import torch

from stages.dit.attention import RangeSpec, SdpaRangeAttention, ranges_to_mask


def _dense(q, k, v, q_ranges, k_ranges):
    """softmax(q k^T / sqrt(d) + mask) v per head with GQA; rows that see nothing give 0."""
    mask = ranges_to_mask(q_ranges, k_ranges, q.shape[0], k.shape[0])
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, vv)


def test_groups_with_split_keys_unseen_rows_and_gqa_match_dense_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(40, 4, 16, generator=g), torch.randn(64, 2, 16, generator=g), torch.randn(64, 2, 16, generator=g)
    rows = [
        (0, 10, 5, 20, 0),  # a chunk over one slice of the buffer (in place)
        (10, 20, 5, 15, 1), (10, 20, 40, 50, 1),  # a text-branch chunk: ring slice + its own window slice
        (20, 30, 50, 60, 2), (30, 40, 50, 55, 2),  # one group, two query ranges with different keys (mask)
    ]
    spec = RangeSpec.from_rows(rows, sq=40, sk=64)
    assert spec.max_seqlen_q == 10 and spec.max_seqlen_k == 15
    backend = SdpaRangeAttention()
    got = backend.attend(q, k, v, backend.prepare(spec))
    t = torch.tensor([r[:4] for r in rows])
    want = _dense(q, k, v, t[:, :2], t[:, 2:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # queries covered by no row get zeros (flash-attn's empty key segment)
    partial = RangeSpec.from_rows([(0, 10, 0, 8, 0)], sq=40, sk=64)
    out = backend.attend(q, k, v, backend.prepare(partial))
    assert out[10:].abs().max() == 0 and out[:10].abs().max() > 0
    # the one-shot form is one group
    torch.testing.assert_close(backend(q, k, v, t[:, :2], t[:, 2:]), want, atol=1e-5, rtol=1e-5)


def test_out_of_range_rows_are_rejected():
    with pytest.raises(ValueError, match="k_ranges out of"):
        RangeSpec.from_rows([(0, 4, 0, 99, 0)], sq=4, sk=10)
    with pytest.raises(ValueError, match="q_ranges out of"):
        RangeSpec.from_rows([(3, 2, 0, 1, 0)], sq=4, sk=10)
