"""Per-job KV storage of clean chunks as separate tensors (the first engine's KV cache).

The engine now keeps K/V in a preallocated pool read in place (:mod:`stages.dit.kv_pool`,
:mod:`cluster.engine.kv_layout`); this dict-of-chunks store remains for one-off callers
(:meth:`ChunkKVCache.history` concatenates, i.e. copies, the chunks it returns).

The reference keeps one buffer for the whole video; here every clean chunk's per-layer
K/V is stored under its global chunk index and chunks below the scheduler's
``kv_keep_from`` are dropped, so a job holds a bounded ring of chunks (DESIGN.md
section 3, "KV cache"). A clean chunk's K/V depend only on its own latent, its absolute
position and the caption branch that wrote it, so reading the ring gives exactly what the
reference reads from its buffer.
"""

from __future__ import annotations

import torch

KV = tuple[torch.Tensor, torch.Tensor]


class ChunkKVCache:
    """K/V of clean chunks: ``chunk -> [(k, v) per layer]``, each (tokens_per_chunk, G, Dh).

    Args:
        num_layers: DiT layers; every stored entry must have that many (k, v) pairs.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._chunks: dict[int, list[KV]] = {}

    def put(self, chunk: int, kv: list[KV]) -> None:
        """Store (or overwrite) the K/V of global chunk ``chunk``.

        Raises:
            ValueError: ``kv`` does not have one (k, v) pair per layer.
        """
        if len(kv) != self.num_layers:
            raise ValueError(f"chunk {chunk}: expected K/V for {self.num_layers} layers, got {len(kv)}")
        self._chunks[chunk] = [(k.detach(), v.detach()) for k, v in kv]

    def __contains__(self, chunk: int) -> bool:
        return chunk in self._chunks

    @property
    def chunks(self) -> list[int]:
        """Stored global chunk indices, ascending."""
        return sorted(self._chunks)

    def history(self, start: int, end: int) -> list[KV] | None:
        """Per-layer K/V of chunks ``[start, end)`` concatenated in chunk order; None if empty.

        Raises:
            KeyError: a chunk in the range is not stored (dropped or never written).
        """
        if end <= start:
            return None
        missing = [c for c in range(start, end) if c not in self._chunks]
        if missing:
            raise KeyError(f"KV cache lacks chunks {missing} (stored: {self.chunks})")
        rows = [self._chunks[c] for c in range(start, end)]
        return [
            (torch.cat([r[layer][0] for r in rows]), torch.cat([r[layer][1] for r in rows]))
            for layer in range(self.num_layers)
        ]

    def drop_before(self, chunk: int) -> None:
        """Release the K/V of every chunk < ``chunk``."""
        for c in [c for c in self._chunks if c < chunk]:
            del self._chunks[c]

    def clear(self) -> None:
        self._chunks.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for kv in self._chunks.values() for pair in kv for t in pair)
