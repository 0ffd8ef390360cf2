"""KV-cached and segmented DiT forwards against their uncached / unbatched equivalents."""

from __future__ import annotations

import torch

from tests.model.dit_fixtures import forward_with_history

TOL = dict(atol=1e-5, rtol=1e-4)


def _inputs(model, k, seed=0, frames=2, hw=8):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x = torch.randn(16, k * frames, hw, hw, generator=gen)
    t = torch.rand(k, generator=gen)
    y = torch.randn(k, cfg.caption_max_length, cfg.caption_channels, generator=gen)
    mask = torch.zeros(k, cfg.caption_max_length, dtype=torch.int64)
    for i in range(k):
        mask[i, : 3 + 4 * i] = 1
    return x, t, y, mask


class _Out:
    def __init__(self, velocity, kv):
        self.velocity, self.kv = velocity, kv


def _fwd(model, **kw) -> _Out:
    return _Out(*forward_with_history(model, **kw))


def _tokens_per_chunk(model, frames=2, hw=8):
    return frames * (hw // model.cfg.patch_size) ** 2


def test_kv_cached_window_equals_full_block_causal_forward(golden_models):
    model = golden_models["base"]
    k, frames, tpc = 4, 2, _tokens_per_chunk(golden_models["base"])
    x, t, y, mask = _inputs(model, k)
    full_range = torch.tensor([[0, (i + 1) * tpc] for i in range(k)])
    full = _fwd(model, x=x, t=t, y=y, y_mask=mask, kv_range=full_range, caption_dropout=torch.zeros(k, dtype=torch.bool))

    split = 2  # chunks 0, 1 are cached; the window is chunks 2, 3
    first = _fwd(model, x=x[:, : split * frames], t=t[:split], y=y[:split], y_mask=mask[:split],
                 kv_range=full_range[:split], caption_dropout=torch.zeros(split, dtype=torch.bool), return_kv=(0, 1))
    history = [
        (torch.cat([first.kv[0][layer][0], first.kv[1][layer][0]]), torch.cat([first.kv[0][layer][1], first.kv[1][layer][1]]))
        for layer in range(model.cfg.num_layers)
    ]
    cached = _fwd(model, x=x[:, split * frames :], t=t[split:], y=y[split:], y_mask=mask[split:],
                  kv_range=full_range[split:], caption_dropout=torch.zeros(k - split, dtype=torch.bool),
                  segments=((k - split, split * frames),), history=history)
    want = full.velocity[:, split * frames :]
    diff = (cached.velocity - want).abs().max().item()
    print(f"KV-cached vs full block-causal forward: max abs diff {diff:.3e}")
    torch.testing.assert_close(cached.velocity, want, **TOL)
    # the cached K/V equal the full forward's own K/V of those chunks (same tokens, same positions)
    again = _fwd(model, x=x, t=t, y=y, y_mask=mask, kv_range=full_range, caption_dropout=torch.zeros(k, dtype=torch.bool),
                 return_kv=(0, 1))
    for layer in range(model.cfg.num_layers):
        torch.testing.assert_close(history[layer][0][:tpc], again.kv[0][layer][0], **TOL)
        torch.testing.assert_close(history[layer][1][tpc:], again.kv[1][layer][1], **TOL)


def test_history_changes_output_only_through_kv_range(golden_models):
    """A window whose kv_range excludes the history ignores it entirely (bit for bit up to SDPA)."""
    model = golden_models["base"]
    tpc = _tokens_per_chunk(model)
    x, t, y, mask = _inputs(model, 2, seed=1)
    hist = [(torch.randn(tpc, 2, 64), torch.randn(tpc, 2, 64)) for _ in range(model.cfg.num_layers)]
    own = torch.tensor([[tpc, 2 * tpc], [tpc, 3 * tpc]])
    no_hist = _fwd(model, x=x, t=t, y=y, y_mask=mask, kv_range=own - tpc, caption_dropout=torch.zeros(2, dtype=torch.bool),
                   segments=((2, 2),))
    with_hist = _fwd(model, x=x, t=t, y=y, y_mask=mask, kv_range=own, caption_dropout=torch.zeros(2, dtype=torch.bool),
                     segments=((2, 2),), history=hist)
    torch.testing.assert_close(with_hist.velocity, no_hist.velocity, **TOL)
    see_hist = _fwd(model, x=x, t=t, y=y, y_mask=mask, kv_range=own - torch.tensor([[tpc, 0]]),
                    caption_dropout=torch.zeros(2, dtype=torch.bool), segments=((2, 2),), history=hist)
    assert (see_hist.velocity - no_hist.velocity).abs().max() > 1e-3


def test_one_chunk_segments_equal_separate_forwards(golden_models):
    """The unconditional CFG branch: each chunk alone with RoPE restarting at 0 (reference
    ``forward_3cfg`` batch of chunks) equals one forward per chunk."""
    model = golden_models["base"]
    tpc = _tokens_per_chunk(model)
    x, t, y, mask = _inputs(model, 3, seed=2)
    own = torch.tensor([[i * tpc, (i + 1) * tpc] for i in range(3)])
    packed = _fwd(model, x=x, t=t, y=y, y_mask=mask, kv_range=own, caption_dropout=torch.ones(3, dtype=torch.bool),
                  segments=((1, 0),) * 3)
    for i in range(3):
        alone = _fwd(model, x=x[:, 2 * i : 2 * i + 2], t=t[i : i + 1], y=y[i : i + 1], y_mask=mask[i : i + 1],
                     kv_range=torch.tensor([[0, tpc]]), caption_dropout=torch.ones(1, dtype=torch.bool))
        torch.testing.assert_close(packed.velocity[:, 2 * i : 2 * i + 2], alone.velocity, **TOL)


def test_bfloat16_model_runs_close_to_float32(tmp_path):
    from stages.config import magi_tiny
    from stages.dit.weights import load_dit, write_tiny_checkpoint

    cfg = magi_tiny().dit
    write_tiny_checkpoint(cfg, tmp_path)
    m32, m16 = load_dit(tmp_path, cfg), load_dit(tmp_path, cfg, dtype=torch.bfloat16)
    x, t, y, mask = _inputs(m32, 2, seed=4)
    inp = dict(x=x, t=t, y=y, y_mask=mask, kv_range=torch.tensor([[0, 32], [0, 64]]),
               caption_dropout=torch.zeros(2, dtype=torch.bool))
    a, b = _fwd(m32, **inp).velocity, _fwd(m16, **inp).velocity
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.1 * a.abs().max()

