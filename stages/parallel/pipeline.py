"""One rank's part of a packed DiT forward over a parallel mesh (context x pipeline parallelism).

The model stays a plain :class:`stages.dit.model.MagiDiT` (no mesh inside): :func:`shard_model`
drops the layers other pipeline stages hold, and every rank of the mesh calls
:func:`pipeline_forward` with its model, its mesh view, the same windows and its own KV pool
shard:

* every rank builds the step's metadata (layout, RoPE rows, adaLN conditions, caption tokens);
  the first pipeline stage also embeds the patches;
* the packed tokens are cut at chunk boundaries into micro-batches of similar token count
  (:func:`split_micro_batches`; never a cut that would let a chunk read K/V that a later
  micro-batch writes, so the result equals the one-shot forward);
* micro-batch by micro-batch, in packed order, each pipeline stage runs its layers on its cp
  rank's token slice (:mod:`stages.parallel.ulysses`; reference ``cp_ulysses_process``) and sends
  the hidden states to the same cp rank of the next pipeline stage (``isend``: the pipeline stage
  moves on to the next micro-batch, so pipeline stages overlap; reference ``pipeline_parallel``
  send/recv);
* the last pipeline stage applies the final LayerNorm + linear, all-gathers the tokens inside its cp
  group and unpatchifies: its ranks return the velocities, the other ranks return None.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stages.dit.attention import RangeSpec
from stages.dit.layers import LayerContext
from stages.dit.packed import KVBuffers, PackedWindow
from stages.dit.step import AbsentLayer, pack_step
from stages.parallel.mesh import ParallelMesh, check_groups
from stages.parallel.ulysses import Ulysses, local_span


@dataclass(frozen=True)
class ChunkSpan:
    """One packed chunk: tokens [start, end), its window, the key ranges it reads and the
    key-buffer span [write[0], write[1]) its K/V are written to."""

    start: int
    end: int
    window: int
    reads: tuple[tuple[int, int], ...]
    write: tuple[int, int]


def chunk_spans(windows: list[PackedWindow], tpcs: list[int]) -> list[ChunkSpan]:
    """The packed chunks of ``windows`` (tokens per chunk ``tpcs``) in packed order."""
    spans, pos = [], 0
    for wi, (w, tpc) in enumerate(zip(windows, tpcs)):
        for i in range(w.k):
            reads = tuple((int(a), int(b)) for a, b in w.key_ranges[i] if int(b) > int(a))
            d = int(w.kv_dest[i])
            spans.append(ChunkSpan(pos, pos + tpc, wi, reads, (d, d + tpc)))
            pos += tpc
    return spans


def _allowed_cuts(spans: list[ChunkSpan]) -> list[int]:
    """Chunk indices c (0 < c < N) before which a micro-batch may start: no chunk before c
    reads keys that a chunk from c on writes (writes of one forward never overlap)."""
    order = sorted(range(len(spans)), key=lambda j: spans[j].write[0])
    starts = [spans[j].write[0] for j in order]
    ends = [spans[j].write[1] for j in order]
    cuts, reach = [], -1
    for i, sp in enumerate(spans[:-1]):
        reach = max(reach, i)
        for s, e in sp.reads:
            for idx in range(bisect_right(ends, s), bisect_left(starts, e)):
                reach = max(reach, order[idx])
        if reach <= i:
            cuts.append(i + 1)
    return cuts


def split_micro_batches(spans: list[ChunkSpan], count: int) -> list[tuple[int, int]]:
    """Cut the packed chunks into at most ``count`` micro-batches of similar token count.

    Returns:
        [(first chunk, end chunk)) per micro-batch, consecutive, covering every chunk. Fewer than
        ``count`` when there are too few chunks or allowed cuts (:func:`_allowed_cuts`).
    Raises:
        ValueError: ``count < 1``.
    """
    if count < 1:
        raise ValueError(f"micro_batches must be >= 1, got {count}")
    if not spans:
        return []
    cuts, total = _allowed_cuts(spans), spans[-1].end
    chosen = set()
    if cuts:
        for k in range(1, count):
            target = total * k / count
            chosen.add(min(cuts, key=lambda c: abs(spans[c].start - target)))
    bounds = [0, *sorted(chosen), len(spans)]
    return list(zip(bounds[:-1], bounds[1:]))


def _rows(t: torch.Tensor, lo: int, hi: int, n: int) -> torch.Tensor:
    """Rows [lo, hi) of ``t`` zero-padded to ``n`` rows."""
    if hi - lo == n:
        return t[lo:hi]
    out = t.new_zeros((n, *t.shape[1:]))
    out[: hi - lo] = t[lo:hi]
    return out


def _sub_spec(spec: RangeSpec, a: int, b: int, k_off: int, sk: int) -> RangeSpec:
    """Rows of ``spec`` whose queries lie in [a, b), queries re-based to a, keys shifted by -k_off."""
    keep = (spec.q_ranges[:, 0] >= a) & (spec.q_ranges[:, 1] <= b)
    return RangeSpec.checked(spec.q_ranges[keep] - a, spec.k_ranges[keep] - k_off, spec.groups[keep], b - a, sk)


class _StepSlicer:
    """Builds the :class:`LayerContext` of micro-batches of one packed step on one rank."""

    def __init__(self, model, step, mesh, kv: KVBuffers, windows: list[PackedWindow], spans: list[ChunkSpan]):
        self.model, self.step, self.mesh, self.kv, self.spans = model, step, mesh, kv, spans
        dev = model.device
        valid = step.layout.y_valid
        lengths = [int(w.y_mask.numel()) for w in windows]
        bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
        self.y_bounds = bounds  # padded caption rows of every window
        counts = [int(valid[bounds[i] : bounds[i + 1]].sum()) for i in range(len(windows))]
        self.y_off = torch.tensor([0, *counts]).cumsum(0).tolist()  # valid caption tokens before each window
        self.valid = valid.to(dev)
        self.token_chunk = step.layout.token_chunk.to(dev)
        self.kv_index = step.layout.kv_index.to(dev)

    def context(self, c0: int, c1: int) -> tuple[LayerContext, int, int, int]:
        """Context of chunks [c0, c1); returns it and the rank's real tokens [lo, hi) (packed
        positions) and its padded token count L."""
        model, step, mesh, dev = self.model, self.step, self.mesh, self.model.device
        a, b = self.spans[c0].start, self.spans[c1 - 1].end
        w0, w1 = self.spans[c0].window, self.spans[c1 - 1].window + 1
        cp = mesh.shape.cp_size
        lo, hi, loc = local_span(b - a, cp, mesh.cp_rank)
        lo, hi = a + lo, a + hi
        lay = step.layout
        self_spec = _sub_spec(lay.self_spec, a, b, 0, lay.self_spec.sk)
        cross_spec = _sub_spec(lay.cross_spec, a, b, self.y_off[w0], self.y_off[w1] - self.y_off[w0])
        ulysses = None
        if cp > 1:
            ulysses = Ulysses(mesh.cp_group, cp, mesh.cp_rank, b - a, loc, mesh.cp_kv_groups)
        ctx = LayerContext(
            rope_sin=_rows(step.rope_sin, lo, hi, loc), rope_cos=_rows(step.rope_cos, lo, hi, loc),
            token_chunk=_rows(self.token_chunk, lo, hi, loc), conditions=step.conditions,
            self_attn=model.attention.prepare(self_spec, dev), cross_attn=model.attention.prepare(cross_spec, dev),
            kv_index=self.kv_index[a:b], kv=self.kv, y_xattn=step.y_xattn[w0:w1],
            y_valid=self.valid[self.y_bounds[w0] : self.y_bounds[w1]], attention=model.attention, cp=ulysses,
        )
        return ctx, lo, hi, loc


def shard_model(model, mesh: ParallelMesh):
    """Keep only the layers of ``mesh.pp_stage`` in ``model`` (a :class:`stages.dit.model.MagiDiT`,
    changed in place: :meth:`~stages.dit.model.MagiDiT.keep_layers`). Returns ``model``.

    Raises:
        ValueError: the heads / KV groups cannot be split ``cp_size`` ways (names cp_size);
            a layer of ``mesh.layers`` is not held (loaded for another pipeline stage).
    """
    check_groups(mesh.shape.cp_size, model.cfg.num_query_groups, model.cfg.num_attention_heads)
    missing = [i for i in mesh.layers if isinstance(model.videodit_blocks.layers[i], AbsentLayer)]
    if missing:
        raise ValueError(f"layers {missing} of pipeline stage {mesh.pp_stage} are not loaded")
    return model.keep_layers(mesh.layers)


def pipeline_forward(model, mesh: ParallelMesh, windows: list[PackedWindow], kv: KVBuffers,
                     cross_per_chunk: bool = True) -> list[torch.Tensor] | None:
    """This rank's part of ``model.forward_packed(windows, kv, cross_per_chunk)`` over ``mesh``
    (see module docstring).

    Args:
        model: a :class:`stages.dit.model.MagiDiT` after :func:`shard_model` for ``mesh``.
        mesh: this rank's view of the mesh (:func:`stages.parallel.mesh.init_mesh`).
        windows: the step's windows (the same on every rank of the mesh).
        kv: this rank's KV shard: ``layer(i)`` for the pipeline stage's i-th layer,
            (Sk, len(kv_groups), Dh).
    Returns:
        per window the (C, T, H, W) float32 velocity on the last pipeline stage's ranks; None
        elsewhere (and ``[]`` everywhere for no windows).
    Raises:
        ValueError: see :meth:`stages.dit.model.MagiDiT.forward_packed` (raised on every rank
            before any communication, since every rank checks the same windows).
    """
    if not windows:
        return []
    shape = mesh.shape
    step = pack_step(model, windows, kv.num_tokens, cross_per_chunk, embed=mesh.is_first_pp_stage)
    spans = chunk_spans(windows, step.tpcs)
    slicer = _StepSlicer(model, step, mesh, kv, windows, spans)
    blocks = [(i, model.videodit_blocks.layers[g]) for i, g in enumerate(mesh.layers)]
    prev = shape.rank_of(mesh.pp_stage - 1, mesh.cp_rank)
    nxt = shape.rank_of(mesh.pp_stage + 1, mesh.cp_rank)
    outs, sends = [], []
    for c0, c1 in split_micro_batches(spans, mesh.micro_batches):
        ctx, lo, hi, loc = slicer.context(c0, c1)
        if mesh.is_first_pp_stage:
            hidden = _rows(step.hidden, lo, hi, loc).contiguous()
        else:
            hidden = torch.empty(loc, model.cfg.hidden_size, dtype=model.params_dtype, device=model.device)
            dist.recv(hidden, src=prev)
        for i, layer in blocks:
            hidden, _ = layer(hidden, ctx, i)
        if not mesh.is_last_pp_stage:
            hidden = hidden.contiguous()
            sends.append((dist.isend(hidden, dst=nxt), hidden))  # keep the tensor alive until sent
            continue
        out = model.head(hidden)
        outs.append(ctx.cp.gather_tokens(out) if ctx.cp is not None else out)
    for work, _ in sends:
        work.wait()
    if not mesh.is_last_pp_stage:
        return None
    return model.unpatchify_windows(torch.cat(outs), step.shapes)
