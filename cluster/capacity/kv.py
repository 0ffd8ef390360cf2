"""The engine's KV pool, sized per GPU rank with the engine's own arithmetic.

The engine (:class:`cluster.engine.Engine`) allocates one :class:`stages.dit.kv_pool.KVPool`
per rank at start-up: per layer one K and one V tensor of shape (num_blocks * block_tokens,
G_rank, Dh). The numbers come from the same functions the engine uses:

* block = one chunk at the model's default size: ``block_tokens =
  DiTConfig.tokens_per_chunk(chunk_width, height / 8, width / 8)`` (``Engine.__init__``);
* a job's region: :func:`cluster.scheduler.kv_areas.default_job_areas` (the areas of
  :func:`cluster.scheduler.kv_areas.kv_areas`: ``history`` [ring | window] + ``text`` + ``uncond``
  for cfg_number 3 = 14 chunks at the shipped settings, ``history`` + ``self_only`` = 6 for distilled
  models), in blocks by :func:`cluster.scheduler.kv_areas.job_blocks` (``ceil(chunks * tpc /
  block_tokens)``, so a job smaller than the default size still takes whole blocks);
* bytes per token per rank: :meth:`stages.dit.kv_pool.KVPool.bytes_per_token` with the
  rank's layers and KV head groups.

Per rank (DESIGN.md section 2; :mod:`stages.parallel.mesh`): context parallelism shards the
K/V by KV head group, ``G / cp_size`` groups per rank when cp_size divides G, and one
(replicated) group per rank when cp_size is a multiple of G (:func:`stages.parallel.mesh.kv_groups_of`); pipeline parallelism keeps
only the pipeline stage's layers (:func:`stages.parallel.weights.pp_stage_layers`; the heaviest
pipeline stage is planned). Elements have the DiT's ``params_dtype`` (the pool dtype is the loaded weights').
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.scheduler.kv_areas import KVAreas, default_job_areas, job_blocks
from stages.config import ModelConfig
from stages.dit.kv_pool import KVPool
from stages.parallel.mesh import kv_groups_of
from stages.parallel.weights import DTYPE_BYTES, pp_stage_layers


def kv_groups_per_rank(num_query_groups: int, cp_size: int) -> int:
    """KV head groups a context-parallel rank stores (:func:`stages.parallel.mesh.kv_groups_of`):
    ``G / cp_size`` (sharded) or 1 (replicated, cp_size a multiple of G).

    Raises:
        ValueError: neither divides the other.
    """
    return len(kv_groups_of(0, cp_size, num_query_groups))


def block_tokens(model: ModelConfig) -> int:
    """Tokens of one KV-pool block: one chunk at the model's default size (``Engine.__init__``)."""
    f, sp = model.vae_spatial_factor, model.sampling
    return model.dit.tokens_per_chunk(sp.chunk_width, model.height // f, model.width // f)


@dataclass(frozen=True)
class KVPlan:
    """One job's share of the engine's KV pool on one rank.

    Attributes:
        areas: the job's region layout in chunks (:class:`cluster.scheduler.kv_areas.KVAreas`).
        tokens_per_chunk: tpc at the planned resolution.
        block_tokens: tokens per pool block (one chunk at the model's default size).
        blocks_per_job: pool blocks of the job's region.
        layers_per_rank, groups_per_rank, head_dim, element_size: the rank's pool dims.
    """

    areas: KVAreas
    tokens_per_chunk: int
    block_tokens: int
    blocks_per_job: int
    layers_per_rank: int
    groups_per_rank: int
    head_dim: int
    element_size: int

    @property
    def token_bytes(self) -> int:
        """K and V of one token over the rank's layers (:meth:`KVPool.bytes_per_token`)."""
        return KVPool.bytes_per_token(self.layers_per_rank, self.groups_per_rank, self.head_dim, self.element_size)

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.token_bytes

    @property
    def bytes_per_job(self) -> int:
        """Bytes of one job's region on the rank (whole blocks)."""
        return self.blocks_per_job * self.block_bytes

    def pool_bytes(self, num_blocks: int) -> int:
        """Bytes of a pool of ``num_blocks`` blocks on the rank (``KVPool.nbytes``)."""
        return num_blocks * self.block_bytes


def kv_plan(model: ModelConfig, height: int, width: int, *, cp_size: int, pp_size: int,
            prefix_chunks: int = 0) -> KVPlan:
    """:class:`KVPlan` of a job of ``height`` x ``width`` pixels (a V2V job with
    ``prefix_chunks`` whole prefix chunks) on the heaviest rank of a cp x pp replica."""
    dit, sp, f = model.dit, model.sampling, model.vae_spatial_factor
    areas = default_job_areas(sp, prefix_chunks)
    tpc = dit.tokens_per_chunk(sp.chunk_width, height // f, width // f)
    block = block_tokens(model)
    return KVPlan(
        areas=areas, tokens_per_chunk=tpc, block_tokens=block, blocks_per_job=job_blocks(areas, tpc, block),
        layers_per_rank=max(len(r) for r in pp_stage_layers(dit.num_layers, pp_size)),
        groups_per_rank=kv_groups_per_rank(dit.num_query_groups, cp_size), head_dim=dit.kv_channels,
        element_size=DTYPE_BYTES[dit.params_dtype],
    )
