"""MAGI-1 DiT: model (:class:`MagiDiT`, packed windows), range-attention
backends, the KV pool, checkpoint I/O.

``stages.dit.weights`` holds ``load_dit`` / ``write_tiny_checkpoint``; ``stages.dit.manifest``
the expected state_dict layouts and ``verify_checkpoint`` (CLI entry points ``main_verify`` /
``main_manifest``); ``stages.dit.fp8`` the SmoothQuant e4m3 linears of fp8 checkpoints;
``stages.dit.token_table`` where the special-token table of a model lives.
"""

from stages.dit.kv_pool import KVPool, PoolRegion
from stages.dit.model import MagiDiT
from stages.dit.packed import DenseKV, PackedWindow

__all__ = ["DenseKV", "KVPool", "MagiDiT", "PackedWindow", "PoolRegion"]
