"""Range-attention specs shaped like the engine's packed forwards, and a dense reference.

:func:`engine_windows` lays out several jobs' windows in one key buffer the way
:mod:`cluster.engine.kv_layout` does: per job a region with ``main`` = [clean ring | window]
(a window chunk's keys = consecutive chunks ending at itself, one slice), the text branch's own
window (keys = [ring part in main] + [own window part], two pieces) and the unconditional branch
(each chunk over itself); captions of different lengths per chunk. :func:`packed_layout` turns
them into the self- and cross-attention :class:`RangeSpec` the DiT uses.
"""

from __future__ import annotations

import math

import torch

from stages.dit.attention import ranges_to_mask
from stages.dit.packed import PackedWindow, packed_layout


def _window(key_ranges, kv_dest, captions: list[int], frames: int, hw: tuple[int, int], length: int) -> PackedWindow:
    k = len(kv_dest)
    y_mask = torch.zeros(k, length, dtype=torch.int64)
    for i, n in enumerate(captions):
        y_mask[i, :n] = 1
    return PackedWindow(
        x=torch.zeros(16, k * frames, *hw), t=torch.full((k,), 0.5), y=torch.zeros(k, length, 8), y_mask=y_mask,
        caption_dropout=torch.zeros(k, dtype=torch.bool), key_ranges=key_ranges, kv_dest=kv_dest,
    )


def _cfg3_job(start: int, tpc: int, ring: int, ranges: list[int], captions: list[int], frames, hw, length):
    """Windows of one cfg-3 job whose region starts at ``start``; returns (windows, tpcs, end)."""
    w = len(ranges)
    main0, text0 = start, start + (ring + w) * tpc
    uncond0 = text0 + (w + 1) * tpc
    main_keys, text_keys = [], []
    for i, r in enumerate(ranges):
        pos = ring + i  # chunk position in main
        main_keys.append([(main0 + max(0, pos - r + 1) * tpc, main0 + (pos + 1) * tpc)])
        ring_from = max(0, pos - r + 1)
        pieces = [(text0 + max(0, i - r + 1) * tpc, text0 + (i + 1) * tpc)]
        if ring_from < ring:
            pieces.insert(0, (main0 + ring_from * tpc, main0 + ring * tpc))
        text_keys.append(pieces)
    main = _window(main_keys, [main0 + (ring + i) * tpc for i in range(w)], captions, frames, hw, length)
    text = _window(text_keys, [text0 + i * tpc for i in range(w)], captions, frames, hw, length)
    uncond = _window([[(uncond0 + i * tpc, uncond0 + (i + 1) * tpc)] for i in range(w)],
                     [uncond0 + i * tpc for i in range(w)], [length] * w, frames, hw, length)
    return [main, text, uncond], [tpc] * 3, uncond0 + w * tpc


def engine_windows(length: int = 24, empty_caption: bool = False):
    """Three jobs (two resolutions, one distilled) -> (windows, tokens per chunk, key-buffer tokens).

    ``empty_caption``: one chunk has no valid caption token (its cross-attention queries see no
    key and must give zeros)."""
    frames, windows, tpcs = 1, [], []
    a, ta, end = _cfg3_job(0, 16, 2, [5, 4, 3, 2], [7, 7, 12, 0 if empty_caption else 3], frames, (8, 8), length)
    windows += a
    tpcs += ta
    b, tb, end = _cfg3_job(end, 36, 1, [3, 2], [length, 5], frames, (12, 12), length)
    windows += b
    tpcs += tb
    # a distilled job (cfg 1): one window of 3 chunks over [ring of 3 | window], no branches
    tpc, ring, start = 16, 3, end
    keys = [[(start + max(0, ring + i - 4) * tpc, start + (ring + i + 1) * tpc)] for i in range(3)]
    windows.append(_window(keys, [start + (ring + i) * tpc for i in range(3)], [9, 9, 9], frames, (8, 8), length))
    tpcs.append(tpc)
    return windows, tpcs, start + (ring + 3) * tpc


def engine_specs(cross_per_chunk: bool = True, empty_caption: bool = False):
    """(self_spec, cross_spec) of :func:`engine_windows`."""
    windows, tpcs, kv_tokens = engine_windows(empty_caption=empty_caption)
    lay = packed_layout(windows, tpcs, kv_tokens, cross_per_chunk)
    return lay.self_spec, lay.cross_spec


def random_qkv(spec, heads: int = 4, groups: int = 2, head_dim: int = 64, dtype=torch.float32, device="cpu", seed=0):
    """(Sq, heads, Dh) q and (Sk, groups, Dh) k, v, standard normal."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(spec.sq, heads, head_dim, generator=g)
    k, v = (torch.randn(spec.sk, groups, head_dim, generator=g) for _ in range(2))
    return tuple(t.to(device, dtype) for t in (q, k, v))


def dense_attention(q, k, v, spec) -> torch.Tensor:
    """float32 softmax(q k^T / sqrt(Dh) + mask) v with GQA, rows that see nothing -> 0."""
    mask = ranges_to_mask(spec.q_ranges, spec.k_ranges, spec.sq, spec.sk, device=q.device)
    q, k, v = q.float(), k.float(), v.float()
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(q.shape[-1])
    p = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, vv)
