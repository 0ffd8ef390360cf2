"""A :class:`~stages.dit.attention.RangeSpec` as flash-attn variable-length sequences.

A varlen kernel (``flash_attn_varlen_func``, ``torch.nn.attention.varlen.varlen_attn``) takes
packed queries and packed keys cut into N sequences by ``cu_seqlens_q`` / ``cu_seqlens_k``
((N + 1,) int32 prefix sums): sequence ``i``'s queries attend to exactly sequence ``i``'s keys.
A range spec is more general: a group's rows may give different queries different key ranges,
and a group's keys may be several pieces of the packed key buffer. :func:`varlen_plan` maps it
exactly:

* every group is cut at its rows' query boundaries; each piece of queries whose visible keys
  (the merged union of the rows covering it) are the same is one sequence. A group in which
  every query sees every key (every self-attention chunk of the engine, every chunk's
  cross-attention over its own caption) is one sequence; a group of several query ranges with
  different keys (the one-window ``forward``'s per-window cross-attention: each chunk over its
  own caption) becomes one sequence per range. The result equals the masked softmax of the
  reference (``flex_flash_attn_func`` with ``q_ranges``/``k_ranges``): the softmax of a query
  runs over exactly the keys it sees.
* the keys of all sequences are laid end to end. When that concatenation is one interval of
  the key buffer (e.g. chunks over consecutive captions) the kernel reads a slice of the buffer
  in place; otherwise (overlapping windows, the text branch's [ring | own window]) one gather
  index for the whole forward makes each layer's K/V one ``index_select``. Overlapping key
  ranges cannot be read in place: sequence ``i``'s keys are ``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]``,
  so the sequences' keys must lie end to end, and the window chunks of one job read
  overlapping slices (each chunk the ``noise2clean_kvrange`` chunks ending at itself). The
  gathered copy is transient (one layer): a cfg-3 job with ranges (5, 4, 3, 2) gathers about
  32 chunks of K/V per layer (main 14, text branch at most 14, unconditional 4).
* queries that see no key are in no sequence; the backend writes zeros there (flash-attn's
  output for an empty key segment). Their absence, or sequences out of query order, makes the
  queries one ``index_select`` too (``q_index``); otherwise the packed queries are ``q`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.dit.attention import RangeSpec, _merge

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class VarlenPlan:
    """Varlen sequences of one :class:`RangeSpec` (CPU; see module docstring).

    Attributes:
        q_spans: per sequence, its [start, end) queries (disjoint, ascending).
        k_pieces: per sequence, its merged key pieces ([start, end) of the key buffer).
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32 prefix sums of the sequences' query and
            key counts (the packed tensors the kernel sees).
        q_index: (sum of query counts,) int64 query rows to pack, or None when the sequences
            cover [0, sq) in order (packed queries = ``q``).
        k_span: (start, end) when the keys of all sequences end to end are one interval of the
            key buffer (read in place; (0, 0) without sequences), else None.
        k_index: (cu_seqlens_k[-1],) int64 key-buffer rows to gather when ``k_span`` is None.
        max_seqlen_q, max_seqlen_k: longest sequence (0 without sequences).
        sq, sk: query tokens and key-buffer tokens of the spec.
    """

    q_spans: tuple[tuple[int, int], ...]
    k_pieces: tuple[tuple[tuple[int, int], ...], ...]
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    q_index: torch.Tensor | None
    k_span: tuple[int, int] | None
    k_index: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    sq: int
    sk: int

    @property
    def num_seqs(self) -> int:
        return len(self.q_spans)


def _group_runs(rows: list[list[int]]) -> list[list[list[int]]]:
    """Consecutive rows with the same group id."""
    runs: list[list[list[int]]] = []
    for r in rows:
        if runs and runs[-1][0][4] == r[4]:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def _group_sequences(rows: list[list[int]]) -> list[tuple[int, int, tuple[tuple[int, int], ...]]]:
    """(q_start, q_end, key pieces) sequences of one group: its queries cut where the set of
    visible keys changes; queries without keys are left out."""
    live = [r for r in rows if r[1] > r[0] and r[3] > r[2]]
    cuts = sorted({r[0] for r in live} | {r[1] for r in live})
    seqs: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []
    for a, b in zip(cuts, cuts[1:]):
        pieces = tuple(_merge([(r[2], r[3]) for r in live if r[0] <= a and r[1] >= b]))
        if not pieces:
            continue
        if seqs and seqs[-1][1] == a and seqs[-1][2] == pieces:
            seqs[-1] = (seqs[-1][0], b, pieces)
        else:
            seqs.append((a, b, pieces))
    return seqs


def _index(spans) -> torch.Tensor:
    parts = [torch.arange(s, e, dtype=torch.int64) for s, e in spans]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _cu(lengths: list[int], what: str) -> torch.Tensor:
    total = sum(lengths)
    if total > INT32_MAX:
        raise ValueError(f"{what}: {total} packed tokens overflow the kernel's int32 cu_seqlens")
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    return out


def varlen_plan(spec: RangeSpec) -> VarlenPlan:
    """The varlen sequences of ``spec`` (see module docstring).

    Raises:
        ValueError: two groups share queries (a :class:`RangeSpec` group owns its queries), or
            more than 2**31 - 1 packed tokens.
    """
    rows = torch.cat([spec.q_ranges, spec.k_ranges, spec.groups[:, None]], dim=1).tolist()
    seqs, owner = [], []
    for run in _group_runs(rows):
        for s in _group_sequences(run):
            seqs.append(s)
            owner.append(run[0][4])
    order = sorted(range(len(seqs)), key=lambda i: seqs[i][0])
    for prev, cur in zip(order, order[1:]):
        if seqs[cur][0] < seqs[prev][1]:
            raise ValueError(
                f"RangeSpec groups {owner[prev]} and {owner[cur]} share queries "
                f"[{seqs[cur][0]}, {min(seqs[prev][1], seqs[cur][1])}): a group must own its queries"
            )
    seqs = [seqs[i] for i in order]
    q_spans = tuple((a, b) for a, b, _ in seqs)
    k_pieces = tuple(p for _, _, p in seqs)
    flat = [piece for p in k_pieces for piece in p]
    k_span, k_index = (0, 0), None
    if flat and all(nxt[0] == cur[1] for cur, nxt in zip(flat, flat[1:])):
        k_span = (flat[0][0], flat[-1][1])
    elif flat:
        k_span, k_index = None, _index(flat)
    q_lens = [b - a for a, b in q_spans]
    k_lens = [sum(e - s for s, e in p) for p in k_pieces]
    covers = sum(q_lens) == spec.sq and all(a == (q_spans[i - 1][1] if i else 0) for i, (a, _) in enumerate(q_spans))
    return VarlenPlan(
        q_spans=q_spans,
        k_pieces=k_pieces,
        cu_seqlens_q=_cu(q_lens, "queries"),
        cu_seqlens_k=_cu(k_lens, "keys"),
        q_index=None if covers else _index(q_spans),
        k_span=k_span,
        k_index=k_index,
        max_seqlen_q=max(q_lens, default=0),
        max_seqlen_k=max(k_lens, default=0),
        sq=spec.sq,
        sk=spec.sk,
    )
