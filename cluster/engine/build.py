"""Building :class:`cluster.engine.loop.Engine`'s parts (never imports ray): checking its
options, loading the DiT and its special-token table from a checkpoint, and the KV pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cluster.engine.ranks import RankGroup, ShardedKVPool
from stages.config import ModelConfig
from stages.dit.kv_pool import KVPool
from stages.dit.model import MagiDiT


def check_options(model_cfg: ModelConfig, dit: MagiDiT, special_tokens: Any, rope_horizon_chunks: int | None) -> None:
    """Raises ValueError: special tokens enabled but no table given or of the wrong width
    (``dit.cfg.caption_channels``); ``rope_horizon_chunks`` < window_size + max(noise2clean_kvrange)."""
    st = model_cfg.special_tokens
    if st.enabled and special_tokens is None:
        raise ValueError(
            f"model {model_cfg.name!r} enables special tokens (special_tokens): pass the table, e.g. "
            "Engine.from_checkpoint(...) or special_tokens=stages.dit.token_table.load_special_tokens(cfg, dit_dir)"
        )
    if st.enabled and special_tokens.dim != dit.cfg.caption_channels:
        raise ValueError(f"special-token width {special_tokens.dim} != caption_channels {dit.cfg.caption_channels}")
    sp = model_cfg.sampling
    if rope_horizon_chunks is not None and rope_horizon_chunks < sp.window_size + max(sp.noise2clean_kvrange, default=1):
        raise ValueError(f"rope_horizon_chunks {rope_horizon_chunks} < window_size + max(noise2clean_kvrange)")


def load_parts(model_cfg: ModelConfig, dit_dir: Path, device: str, dtype: torch.dtype, attention: str,
               ranks: RankGroup | None) -> tuple[MagiDiT, str, Any]:
    """The DiT, its device and the special-token table for ``Engine.from_checkpoint`` (see there).
    With ``ranks`` the DiT is rank 0's shard (already loaded, on its own device).

    Raises:
        FileNotFoundError, stages.dit.weights.CheckpointMismatch: see the loaders.
        ValueError, RuntimeError: an unknown attention backend, or "flash" where it cannot run.
    """
    from stages.dit.flash_attention import make_attention  # noqa: PLC0415
    from stages.dit.token_table import load_special_tokens  # noqa: PLC0415
    from stages.dit.weights import load_dit  # noqa: PLC0415

    if ranks is not None:
        dit = ranks.local.dit
        device = str(dit.device)
    else:
        dit = load_dit(Path(dit_dir), model_cfg.dit, device=device, dtype=dtype, distill=model_cfg.sampling.distill)
        dit.attention = make_attention(attention, device)
    return dit, device, load_special_tokens(model_cfg, Path(dit_dir))


def make_pool(dit: MagiDiT, device: torch.device, blocks: int, block_tokens: int, ranks: RankGroup | None):
    """The engine's KV pool of ``blocks`` blocks of ``block_tokens`` tokens: a :class:`KVPool` on
    ``device`` in the DiT's dtype, or spread over the mesh's ranks (:class:`ShardedKVPool`)."""
    if ranks is not None:
        return ShardedKVPool(ranks, num_blocks=blocks, block_tokens=block_tokens)
    cfg = dit.cfg
    return KVPool(num_layers=cfg.num_layers, num_blocks=blocks, block_tokens=block_tokens,
                  num_groups=cfg.num_query_groups, head_dim=cfg.kv_channels, dtype=dit.params_dtype, device=device)
