"""One-window form of the MAGI-1 DiT forward: :class:`DiTInput` -> :class:`DiTOutput`.

One call of :meth:`stages.dit.model.MagiDiT.forward` (:func:`forward_window`) is one reference
``VideoDiTModel.forward`` generalised to a *window* of K chunks packed along time without a batch dim:

* every chunk has its own timestep, caption (+ mask), adaLN null-row choice
  (``caption_dropout``) and key range over keys = [history K/V] + [window tokens];
* the chunks are grouped into *segments* (a reference batch element): each segment has a
  RoPE frame offset, so a window that continues a video gets absolute t-positions
  (reference ``slice_point``) and the unconditional CFG branch (every chunk alone,
  positions restarting at 0) is a window of 1-chunk segments;
* the K/V of chosen chunks can be returned for every layer.

It is the one-window special case of :meth:`~stages.dit.model.MagiDiT.forward_packed` with a
private key buffer (:class:`stages.dit.packed.DenseKV`); the engine uses the KV pool instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stages.dit.layers import KV
from stages.dit.packed import DenseKV, PackedWindow


@dataclass
class DiTInput:
    """Inputs of one DiT forward over a window of K chunks.

    Attributes:
        x: (C, T, H, W) latent frames of the K chunks in window order (C = 16 latent
            channels, or ``in_channels``; T = K * frames per chunk; H, W latent pixels).
        t: (K,) float32 timestep per chunk (0 noise, 1 clean).
        y: (K, L, caption_channels) caption embedding per chunk.
        y_mask: (K, L) int/bool, 1 = valid caption token.
        kv_range: (K, 2) int64 [start, end) in tokens over keys = [history | window].
        caption_dropout: (K,) bool; adaLN uses ``null_caption_embedding[-1]`` if True else
            ``[-2]`` (reference ``caption_dropout_mask``).
        segments: ((num_chunks, rope_frame_offset), ...) covering the K chunks in order;
            a segment's RoPE t-positions start at ``rope_frame_offset`` latent frames
            (reference ``slice_point * chunk_width``).
            Default: one segment at offset 0.
        distill_dt: optional (K,) float32 shortcut step size; when given,
            ``t_embedder(distill_dt)`` is added to the timestep embedding (reference
            ``engine_config.distill`` branch of ``get_embedding_and_meta``).
        history: optional per-layer cached (k, v), each (Sh, G, Dh): K/V of earlier clean
            chunks in key order (the first Sh keys).
        return_kv: window chunk indices whose per-layer K/V to return.
    """

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    y_mask: torch.Tensor
    kv_range: torch.Tensor
    caption_dropout: torch.Tensor
    segments: tuple[tuple[int, int], ...] | None = None
    distill_dt: torch.Tensor | None = None
    history: list[KV] | None = None
    return_kv: tuple[int, ...] = ()


@dataclass
class DiTOutput:
    """``velocity`` (16 or out_channels, T, H, W) float32 like ``x``; ``kv[c]`` = per-layer
    (k, v) of window chunk c, each (tokens_per_chunk, G, Dh), for c in ``return_kv``."""

    velocity: torch.Tensor
    kv: dict[int, list[KV]] = field(default_factory=dict)


def forward_window(model: torch.nn.Module, inp: DiTInput) -> DiTOutput:
    """Run ``model`` (a :class:`stages.dit.model.MagiDiT`; not imported here, which imports this module) over one window (see :class:`DiTInput`); returns :class:`DiTOutput`.

    One-off form of :meth:`~stages.dit.model.MagiDiT.forward_packed`: the keys live in a private
    buffer ``[history | window]`` (the history is copied in; the engine uses the KV pool instead).

    Raises:
        RuntimeError: ``model`` is sharded over a parallel mesh (it runs ``forward_packed`` only).
        ValueError: inconsistent shapes (chunk count vs T, segments, kv_range, history);
            a key range outside [0, history + window tokens].
    """
    cfg = model.cfg
    if model.mesh is not None:
        raise RuntimeError("MagiDiT.forward is single-process; a sharded model runs forward_packed")
    k_chunks = int(inp.t.shape[0])
    if inp.x.ndim != 4:
        raise ValueError(f"x must be (C, T, H, W), got {tuple(inp.x.shape)}")
    if k_chunks == 0 or inp.x.shape[1] % k_chunks:
        raise ValueError(f"x has {inp.x.shape[1]} frames, not a multiple of {k_chunks} chunks")
    tpc = model.tokens_per_chunk(inp.x.shape[1] // k_chunks, inp.x.shape[2], inp.x.shape[3])
    hist = 0 if not inp.history else int(inp.history[0][0].shape[0])
    kv_range = inp.kv_range.to("cpu", torch.int64)
    if tuple(kv_range.shape) != (k_chunks, 2):
        raise ValueError(f"kv_range must be ({k_chunks}, 2), got {tuple(kv_range.shape)}")
    buf = DenseKV(cfg.num_layers, hist + k_chunks * tpc, cfg.num_query_groups, cfg.kv_channels,
                  model.params_dtype, model.device, inp.history)
    window = PackedWindow(
        x=inp.x, t=inp.t, y=inp.y, y_mask=inp.y_mask, caption_dropout=inp.caption_dropout,
        key_ranges=[[(int(a), int(b))] for a, b in kv_range.tolist()],
        kv_dest=[hist + i * tpc for i in range(k_chunks)], segments=inp.segments, distill_dt=inp.distill_dt,
    )
    velocity = model.forward_packed([window], buf, cross_per_chunk=False)[0]

    def chunk_kv(i: int) -> list[KV]:  # per-layer (k, v) of window chunk i, copied out of the buffer
        span = slice(hist + i * tpc, hist + (i + 1) * tpc)
        return [(kb[span].clone(), vb[span].clone()) for kb, vb in (buf.layer(n) for n in range(cfg.num_layers))]

    return DiTOutput(velocity=velocity, kv={i: chunk_kv(i) for i in inp.return_kv})
