"""MAGI-1 DiT: model (:class:`MagiDiT`), range-attention backends, per-job KV cache, checkpoint I/O.

``stages.dit.weights`` holds ``load_dit`` / ``write_tiny_checkpoint``.
"""

from stages.dit.kv_cache import ChunkKVCache
from stages.dit.model import DiTInput, DiTOutput, MagiDiT

__all__ = ["ChunkKVCache", "DiTInput", "DiTOutput", "MagiDiT"]
