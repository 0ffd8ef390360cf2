"""The parallel mesh of one DiT: ``pp_size`` pipeline stages x ``cp_size`` context-parallel ranks.

Rank ``r`` is cp rank ``r % cp_size`` of pipeline stage (``pp_stage``) ``r // cp_size``. A
pipeline stage holds the consecutive layers :func:`stages.parallel.weights.pp_stage_layers` gives
it (reference ``_get_layer_offset``); inside a pipeline stage the packed tokens are split over the
cp ranks and attention runs head-parallel after an all-to-all (Ulysses; reference
``cp_ulysses_process`` / ``ulysses_a2a``).
KV cache shards: a rank stores its pipeline stage's layers and the KV head groups (``num_query_groups``,
G) its query heads read: ``G / cp_size`` groups each when ``cp_size <= G``, one group replicated
on ``cp_size / G`` ranks when ``cp_size > G`` (:func:`kv_groups_of`; splitting and merging the
K/V themselves: :mod:`stages.parallel.kv_shards`).

The model (:class:`stages.dit.model.MagiDiT`) holds no mesh: a rank passes its mesh and its model
to :func:`stages.parallel.pipeline.pipeline_forward`; a single-process run has no mesh at all.
Everything here is torch.distributed (gloo on CPU, NCCL on CUDA); nothing imports Ray.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from stages.parallel.weights import pp_stage_layers


@dataclass(frozen=True)
class MeshShape:
    """``cp_size`` context-parallel ranks per pipeline stage x ``pp_size`` pipeline stages."""

    cp_size: int = 1
    pp_size: int = 1

    def __post_init__(self):
        for name in ("cp_size", "pp_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    @property
    def world_size(self) -> int:
        return self.cp_size * self.pp_size

    def pp_stage_of(self, rank: int) -> int:
        return rank // self.cp_size

    def cp_rank_of(self, rank: int) -> int:
        return rank % self.cp_size

    def rank_of(self, pp_stage: int, cp_rank: int) -> int:
        return pp_stage * self.cp_size + cp_rank

    @property
    def result_rank(self) -> int:
        """The rank whose forward returns the velocities the engine uses (cp rank 0 of the last pipeline stage)."""
        return self.rank_of(self.pp_size - 1, 0)


def kv_groups_of(cp_rank: int, cp_size: int, num_groups: int) -> range:
    """KV head groups a cp rank stores and attends with (its query heads' groups).

    ``cp_size <= G``: groups ``[r G / cp, (r + 1) G / cp)``; ``cp_size > G``: group
    ``r // (cp / G)`` (replicated on ``cp / G`` ranks). Query head h uses group
    ``h // (Hq / G)`` (flash-attn GQA convention).

    Raises:
        ValueError: neither ``G % cp_size == 0`` nor ``cp_size % G == 0``.
    """
    check_groups(cp_size, num_groups)
    if cp_size <= num_groups:
        per = num_groups // cp_size
        return range(cp_rank * per, (cp_rank + 1) * per)
    g = cp_rank // (cp_size // num_groups)
    return range(g, g + 1)


def check_groups(cp_size: int, num_groups: int, num_heads: int | None = None) -> None:
    """Raises ValueError (naming cp_size) when the KV groups / heads cannot be split ``cp_size`` ways."""
    if num_groups % cp_size and cp_size % num_groups:
        raise ValueError(f"cp_size {cp_size} must divide or be a multiple of num_query_groups {num_groups}")
    if num_heads is not None and num_heads % cp_size:
        raise ValueError(f"cp_size {cp_size} must divide num_attention_heads {num_heads}")


def check_layers(pp_size: int, num_layers: int) -> None:
    """Raises ValueError (naming pp_size) unless the layers split evenly into ``pp_size`` pipeline stages."""
    if num_layers < pp_size or num_layers % pp_size:
        raise ValueError(f"pp_size {pp_size} must divide num_layers {num_layers} (equal pipeline stages, reference "
                         "_get_layer_offset)")


@dataclass
class ParallelMesh:
    """One process's view of the mesh (built by :func:`init_mesh`).

    Attributes:
        shape, rank, pp_stage, cp_rank: the mesh and this rank's place in it.
        layers: global DiT layer indices of this rank's pipeline stage.
        cp_group: torch.distributed group of this pipeline stage's cp ranks (None when cp_size == 1).
        kv_groups: KV head groups this rank stores (:func:`kv_groups_of`).
        cp_kv_groups: the groups of every cp rank of the pipeline stage, by cp rank.
        micro_batches: pipeline micro-batches per forward (1 without a pipeline unless asked).
    """

    shape: MeshShape
    rank: int
    pp_stage: int
    cp_rank: int
    layers: range
    cp_group: Any
    kv_groups: range
    cp_kv_groups: tuple[range, ...]
    micro_batches: int

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_stage == self.shape.pp_size - 1


def build_mesh(shape: MeshShape, rank: int, *, num_query_groups: int, num_layers: int,
               micro_batches: int | None = None, cp_group: Any = None) -> ParallelMesh:
    """The mesh view of ``rank`` without touching torch.distributed (validation + bookkeeping).

    ``micro_batches`` None: ``2 * pp_size`` with a pipeline, 1 without.

    Raises:
        ValueError: bad rank, cp_size vs num_query_groups, pp_size vs num_layers, micro_batches < 1.
    """
    if not 0 <= rank < shape.world_size:
        raise ValueError(f"rank {rank} outside the mesh of {shape.world_size} ranks (cp_size x pp_size)")
    check_groups(shape.cp_size, num_query_groups)
    check_layers(shape.pp_size, num_layers)
    if micro_batches is None:
        micro_batches = 2 * shape.pp_size if shape.pp_size > 1 else 1
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    pp_stage, cp_rank = shape.pp_stage_of(rank), shape.cp_rank_of(rank)
    groups = tuple(kv_groups_of(r, shape.cp_size, num_query_groups) for r in range(shape.cp_size))
    return ParallelMesh(shape=shape, rank=rank, pp_stage=pp_stage, cp_rank=cp_rank,
                        layers=pp_stage_layers(num_layers, shape.pp_size)[pp_stage], cp_group=cp_group,
                        kv_groups=groups[cp_rank], cp_kv_groups=groups, micro_batches=micro_batches)


def init_mesh(shape: MeshShape, rank: int, init_method: str, backend: str = "gloo", timeout_s: float = 120, *,
              num_query_groups: int, num_layers: int, micro_batches: int | None = None,
              num_attention_heads: int | None = None) -> ParallelMesh:
    """Join the process group of the mesh and create every pipeline stage's cp group.

    Args:
        shape: the mesh; rank: this process's rank.
        init_method: torch.distributed rendezvous (``tcp://host:port``, :func:`free_tcp_init_method`).
        backend: ``gloo`` (CPU tensors) or ``nccl`` (CUDA tensors).
        timeout_s: seconds to wait for the other ranks (rendezvous and every collective).
        num_query_groups, num_layers: the DiT's (validation and shard layout).
        micro_batches: see :func:`build_mesh`.
        num_attention_heads: when given, also checks ``heads % cp_size == 0``.

    Raises:
        ValueError: the model cannot be split this way (names cp_size / pp_size / micro_batches).
        RuntimeError / torch.distributed errors: the other ranks did not join in ``timeout_s``.
    """
    check_groups(shape.cp_size, num_query_groups, num_attention_heads)
    mesh = build_mesh(shape, rank, num_query_groups=num_query_groups, num_layers=num_layers,
                      micro_batches=micro_batches)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=shape.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    if shape.cp_size > 1:
        for pp_stage in range(shape.pp_size):  # every rank creates every group, same order
            group = dist.new_group([shape.rank_of(pp_stage, c) for c in range(shape.cp_size)],
                                   timeout=datetime.timedelta(seconds=timeout_s))
            if pp_stage == mesh.pp_stage:
                mesh.cp_group = group
    return mesh


def destroy_mesh(mesh: ParallelMesh | None) -> None:
    """Leave the mesh (destroys this process's default process group and its subgroups)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if mesh is not None:
        mesh.cp_group = None


def free_tcp_init_method(host: str = "127.0.0.1") -> str:
    """``tcp://host:port`` with a port free at the time of the call (for rank 0's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"tcp://{host}:{port}"
