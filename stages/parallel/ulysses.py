"""Ulysses all-to-alls of one context-parallel micro-batch (reference ``ulysses_a2a`` /
``cp_ulysses_process``; DeepSpeed-Ulysses, Jacobs et al. 2023, section 3).

A micro-batch of ``n`` packed tokens is padded to ``cp_size * L`` and split contiguously: cp
rank r owns tokens ``[r L, (r + 1) L)`` (the tail of the last ranks is padding). Projections run
on the local tokens; :meth:`Ulysses.to_heads` turns (L, H, Dh) into (n, H / cp, Dh) (all tokens,
this rank's heads), :meth:`Ulysses.kv_to_heads` does the same for K/V with the KV groups each
rank stores (sharded or replicated, :func:`stages.parallel.mesh.kv_groups_of`), and
:meth:`Ulysses.to_tokens` is the way back. All-to-alls move data only: they are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def local_span(n: int, cp_size: int, cp_rank: int) -> tuple[int, int, int]:
    """(start, end, L): the real tokens [start, end) of ``n`` that cp rank ``cp_rank`` owns and
    its padded token count ``L = ceil(n / cp_size)``."""
    per = -(-n // cp_size)
    start = min(n, cp_rank * per)
    return start, min(n, start + per), per


@dataclass(frozen=True)
class Ulysses:
    """All-to-alls of one micro-batch inside a pipeline stage's cp group.

    Attributes:
        group: the torch.distributed cp group; cp_size: its size; cp_rank: this rank in it.
        tokens: real tokens ``n`` of the micro-batch; local: padded tokens per rank ``L``.
        kv_groups: per cp rank, the KV head groups it stores (equal counts).
    """

    group: Any
    cp_size: int
    cp_rank: int
    tokens: int
    local: int
    kv_groups: tuple[range, ...]

    def _exchange(self, send: torch.Tensor) -> torch.Tensor:
        """(cp, L, ...) contiguous, block r for cp rank r -> (cp, L, ...), block r from cp rank r."""
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(L, H, Dh) local tokens, all heads -> (n, H / cp, Dh) all tokens, this rank's heads."""
        loc, h, d = x.shape
        send = x.view(loc, self.cp_size, h // self.cp_size, d).transpose(0, 1).contiguous()
        return self._exchange(send).view(self.cp_size * loc, h // self.cp_size, d)[: self.tokens]

    def kv_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(L, G, Dh) local K/V, all groups -> (n, g, Dh) all tokens, the g groups this rank stores."""
        send = torch.stack([x[:, g.start : g.stop] for g in self.kv_groups]).contiguous()
        recv = self._exchange(send)
        return recv.view(self.cp_size * self.local, *recv.shape[2:])[: self.tokens]

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(n, H / cp, Dh) all tokens, this rank's heads -> (L, H, Dh) local tokens, all heads."""
        _, hl, d = x.shape
        send = x.new_zeros(self.cp_size * self.local, hl, d)
        send[: self.tokens] = x
        recv = self._exchange(send.view(self.cp_size, self.local, hl, d))
        return recv.transpose(0, 1).reshape(self.local, self.cp_size * hl, d)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(L, F) local rows -> (n, F) rows of every rank in token order (all-gather)."""
        parts = [torch.empty_like(x) for _ in range(self.cp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)[: self.tokens]
