"""A rank's shard of the KV pool over a parallel mesh (:mod:`stages.parallel.mesh`).

A rank stores its pipeline stage's layers (:func:`stages.parallel.weights.pp_stage_layers`) and the KV
head groups its query heads read (:func:`stages.parallel.mesh.kv_groups_of`). :func:`pool_dims`
sizes that shard, :func:`split_kv` cuts full per-layer K/V into every rank's part and
:func:`merge_kv_reads` puts the parts read back from every rank together again.
"""

from __future__ import annotations

import torch

from stages.config import DiTConfig
from stages.parallel.mesh import MeshShape, ParallelMesh, kv_groups_of
from stages.parallel.weights import pp_stage_layers

KV = tuple[torch.Tensor, torch.Tensor]


def pool_dims(cfg: DiTConfig, mesh: ParallelMesh | None) -> tuple[int, int]:
    """(num_layers, num_groups) of a rank's KV pool shard (the whole model without a mesh)."""
    if mesh is None:
        return cfg.num_layers, cfg.num_query_groups
    return len(mesh.layers), len(mesh.kv_groups)


def merge_kv_reads(reads_by_rank: list[list[KV]], shape: MeshShape, cfg: DiTConfig) -> list[KV]:
    """Full per-layer K/V from every rank's :meth:`stages.dit.kv_pool.KVPool.read` of one token span.

    Args:
        reads_by_rank: by rank, per local layer (k, v), each (T, groups of the rank, Dh).
    Returns:
        per global layer (k, v), each (T, G, Dh); a replicated group comes from its first holder.
    Raises:
        ValueError: wrong number of ranks or layers.
    """
    if len(reads_by_rank) != shape.world_size:
        raise ValueError(f"expected reads of {shape.world_size} ranks, got {len(reads_by_rank)}")
    layers = pp_stage_layers(cfg.num_layers, shape.pp_size)
    groups = [kv_groups_of(c, shape.cp_size, cfg.num_query_groups) for c in range(shape.cp_size)]
    holders = [next(c for c in range(shape.cp_size) if g in groups[c]) for g in range(cfg.num_query_groups)]
    out: list[KV] = []
    for layer in range(cfg.num_layers):
        pp_stage = layer // len(layers[0])
        local = layer - layers[pp_stage].start
        parts_k, parts_v = [], []
        for c in sorted(set(holders), key=holders.index):
            read = reads_by_rank[shape.rank_of(pp_stage, c)]
            if len(read) != len(layers[pp_stage]):
                raise ValueError(f"rank {shape.rank_of(pp_stage, c)} read {len(read)} layers, its pipeline stage "
                                 f"has {len(layers[pp_stage])}")
            keep = [i for i, g in enumerate(groups[c]) if holders[g] == c]
            parts_k.append(read[local][0][:, keep])
            parts_v.append(read[local][1][:, keep])
        out.append((torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)))
    return out


def split_kv(kv_full: list[KV], mesh_shape: MeshShape, rank: int, cfg: DiTConfig) -> list[KV]:
    """The part of full per-layer K/V ((T, G, Dh) each, all layers) that ``rank`` stores:
    its pipeline stage's layers and its KV groups, as contiguous tensors.

    Raises:
        ValueError: ``kv_full`` does not have ``cfg.num_layers`` layers of G groups.
    """
    if len(kv_full) != cfg.num_layers:
        raise ValueError(f"expected K/V for {cfg.num_layers} layers, got {len(kv_full)}")
    pp_stage, c = mesh_shape.pp_stage_of(rank), mesh_shape.cp_rank_of(rank)
    groups = kv_groups_of(c, mesh_shape.cp_size, cfg.num_query_groups)
    out = []
    for layer in pp_stage_layers(cfg.num_layers, mesh_shape.pp_size)[pp_stage]:
        k, v = kv_full[layer]
        if k.shape[1] != cfg.num_query_groups:
            raise ValueError(f"layer {layer} K/V has {k.shape[1]} groups, the model {cfg.num_query_groups}")
        out.append((k[:, groups.start : groups.stop].contiguous(), v[:, groups.start : groups.stop].contiguous()))
    return out
