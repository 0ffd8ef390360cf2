"""The DiT of one engine spread over the ranks of a parallel mesh (DESIGN.md section 2).

With ``cp_size x pp_size > 1`` an engine's DiT runs on ``world_size`` ranks that form a
torch.distributed group (:mod:`stages.parallel.mesh`: Ulysses context parallelism inside a
pipeline stage, pipeline stages of consecutive layers). Rank 0 is the engine's own process: it holds
the scheduler, the jobs and its own shard. Ranks 1..N-1 each run a :class:`RankWorker`,
reached through :class:`Peers` (Ray actors in the replica's placement group,
:mod:`cluster.serve.ranks`; this module never imports Ray).

Every rank executes the same operations in the same order:

* a forward (:class:`ShardedForward`): every rank calls
  :func:`stages.parallel.pipeline.pipeline_forward` with its DiT shard, its mesh view, the same
  packed windows and its own pool shard; the velocities of the mesh's ``result_rank`` (first
  rank of the last pipeline stage) are the step's result;
* KV-pool storage operations (:class:`ShardedKVPool`): moves and RoPE re-basing run on every
  shard; snapshot reads merge the shards, writes split them
  (:func:`stages.parallel.kv_shards.merge_kv_reads` / :func:`stages.parallel.kv_shards.split_kv`).

Allocation (which job owns which blocks) is bookkeeping on rank 0 only: every shard has the same
block layout, so a region means the same tokens on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from stages.config import ModelConfig
from stages.dit.kv_pool import KVPool
from stages.dit.model import MagiDiT
from stages.dit.packed import PackedWindow
from stages.dtypes import torch_dtype
from stages.parallel.kv_shards import merge_kv_reads, pool_dims, split_kv
from stages.parallel.mesh import MeshShape, ParallelMesh, destroy_mesh, init_mesh
from stages.parallel.pipeline import pipeline_forward, shard_model



class PeerCall(Protocol):
    """An operation running on every peer rank."""

    def wait(self) -> list[Any]:
        """Results of ranks 1..N-1 in rank order; raises the first rank's error."""
        ...


class Peers(Protocol):
    """Ranks 1..N-1 of a mesh, each a :class:`RankWorker` (methods called by name)."""

    def launch(self, method: str, *args: Any) -> PeerCall:
        """Start ``RankWorker.<method>(*args)`` on every peer (same arguments), non-blocking."""
        ...

    def launch_each(self, method: str, args: Sequence[tuple]) -> PeerCall:
        """Start ``RankWorker.<method>(*args[i])`` on peer rank ``i + 1``, non-blocking."""
        ...

    def close(self) -> None:
        """Stop the peer processes."""
        ...


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to join its mesh and load its shard (picklable).

    Attributes:
        model_cfg: the served model; dit_dir: its DiT checkpoint folder.
        shape: the mesh; rank: this rank; init_method: torch.distributed rendezvous
            (``tcp://host:port`` of rank 0's store).
        backend: ``gloo`` (CPU) or ``nccl`` (CUDA); device: ``cpu`` or ``cuda``.
        dtype: transformer-block weight dtype name (``float32``, ``bfloat16``, ``float16``).
        micro_batches: pipeline micro-batches per forward (None: the mesh default).
        timeout_s: seconds a rank waits for the others (rendezvous and collectives).
        torch_threads: torch intra-op threads of this rank's process (None: leave as is).
        attention: range-attention backend name (:func:`stages.dit.flash_attention.make_attention`).
    """

    model_cfg: ModelConfig
    dit_dir: str
    shape: MeshShape
    rank: int
    init_method: str
    backend: str = "gloo"
    device: str = "cpu"
    dtype: str = "float32"
    micro_batches: int | None = None
    timeout_s: float = 120.0
    torch_threads: int | None = None
    attention: str = "sdpa"


class RankWorker:
    """One rank: its mesh view, its DiT shard (its pipeline stage's layers) and its KV-pool shard.

    Construction joins the mesh (blocks until every rank has joined) and loads the shard
    (:func:`stages.dit.weights.load_dit` with the pipeline stage's layers).

    Raises:
        ValueError: a mesh the model cannot be split into (named field: cp_size / pp_size).
        FileNotFoundError, stages.dit.weights.CheckpointMismatch: see the loader.
        RuntimeError / torch.distributed errors: the other ranks did not join in ``timeout_s``.
    """

    def __init__(self, spec: RankSpec):
        from stages.dit.flash_attention import make_attention  # noqa: PLC0415
        from stages.dit.weights import load_dit  # noqa: PLC0415

        cfg = spec.model_cfg.dit
        self.spec = spec
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.mesh: ParallelMesh = init_mesh(spec.shape, spec.rank, spec.init_method, spec.backend, spec.timeout_s,
                                            num_query_groups=cfg.num_query_groups, num_layers=cfg.num_layers,
                                            micro_batches=spec.micro_batches, num_attention_heads=cfg.num_attention_heads)
        dit = load_dit(Path(spec.dit_dir), cfg, device=spec.device, dtype=torch_dtype(spec.dtype),
                       distill=spec.model_cfg.sampling.distill, layers=self.mesh.layers)
        dit.attention = make_attention(spec.attention, spec.device)
        self.dit: MagiDiT = shard_model(dit, self.mesh).eval()
        self.pool: KVPool | None = None

    def ready(self) -> int:
        """This rank's index (a cheap call to check that the rank is up)."""
        return self.mesh.rank

    def make_pool(self, num_blocks: int, block_tokens: int) -> int:
        """Allocate this rank's pool shard (same blocks as rank 0, its layers and KV groups).
        Returns its size in bytes."""
        num_layers, num_groups = pool_dims(self.dit.cfg, self.mesh)
        self.pool = KVPool(num_layers=num_layers, num_blocks=num_blocks, block_tokens=block_tokens,
                           num_groups=num_groups, head_dim=self.dit.cfg.kv_channels, dtype=self.dit.params_dtype,
                           device=self.dit.device)
        return self.pool.nbytes

    @torch.no_grad()
    def forward(self, windows: list[PackedWindow]) -> list[torch.Tensor] | None:
        """This rank's part of one packed forward; velocities (CPU) on the result rank, else None."""
        out = pipeline_forward(self.dit, self.mesh, windows, self.pool)
        if self.mesh.rank != self.mesh.shape.result_rank:
            return None
        return [v.cpu() for v in out]

    def pool_move(self, src: int, dst: int, tokens: int) -> None:
        self.pool.move(src, dst, tokens)

    def pool_apply(self, start: int, tokens: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.pool.apply(start, tokens, fn)

    def pool_read(self, start: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.pool.read(start, tokens)

    def pool_write(self, start: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pool.write(start, kv)

    def close(self) -> None:
        """Leave the mesh (destroys this process's torch.distributed state)."""
        destroy_mesh(self.mesh)


@dataclass
class RankGroup:
    """Rank 0 (this process's :class:`RankWorker`) and its peers."""

    local: RankWorker
    peers: Peers

    @property
    def shape(self) -> MeshShape:
        return self.local.mesh.shape

    def close(self) -> None:
        """Stop the peers, then leave the mesh."""
        self.peers.close()
        self.local.close()


class ShardedKVPool(KVPool):
    """Rank 0's pool shard; every storage operation also runs on the peers' shards.

    Allocation (``alloc`` / ``release``) stays local bookkeeping. ``read`` returns the full
    per-layer K/V (all layers, all KV groups) merged from every shard; ``write`` takes them
    and gives each rank its part. ``token_bytes`` / ``nbytes`` are rank 0's shard.
    """

    def __init__(self, group: RankGroup, *, num_blocks: int, block_tokens: int):
        local = group.local
        num_layers, num_groups = pool_dims(local.dit.cfg, local.mesh)
        super().__init__(num_layers=num_layers, num_blocks=num_blocks, block_tokens=block_tokens,
                         num_groups=num_groups, head_dim=local.dit.cfg.kv_channels, dtype=local.dit.params_dtype,
                         device=local.dit.device)
        self.group = group
        group.peers.launch("make_pool", num_blocks, block_tokens).wait()
        local.pool = self

    def move(self, src: int, dst: int, tokens: int) -> None:
        call = self.group.peers.launch("pool_move", src, dst, tokens)
        super().move(src, dst, tokens)
        call.wait()

    def apply(self, start: int, tokens: int, fn: Callable[[torch.Tensor], torch.Tensor], keys_only: bool = True) -> None:
        if not keys_only:
            raise ValueError("a sharded pool re-bases keys only (keys_only=True)")
        call = self.group.peers.launch("pool_apply", start, tokens, fn)
        super().apply(start, tokens, fn)
        call.wait()

    def read(self, start: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        call = self.group.peers.launch("pool_read", start, tokens)
        local = super().read(start, tokens)
        return merge_kv_reads([local, *call.wait()], self.group.shape, self.group.local.dit.cfg)

    def write(self, start: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        shape, cfg = self.group.shape, self.group.local.dit.cfg
        parts = [split_kv(kv, shape, r, cfg) for r in range(shape.world_size)]
        call = self.group.peers.launch_each("pool_write", [(start, p) for p in parts[1:]])
        super().write(start, parts[0])
        call.wait()


class ShardedForward:
    """``forward_packed(windows, pool)`` over the whole mesh (same signature as
    :meth:`stages.dit.model.MagiDiT.forward_packed`); returns the result rank's velocities."""

    def __init__(self, group: RankGroup):
        self.group = group

    def __call__(self, windows: list[PackedWindow], pool: KVPool) -> list[torch.Tensor]:
        call = self.group.peers.launch("forward", windows)
        try:
            local = self.group.local.forward(windows)
        finally:
            remote = call.wait()
        result_rank = self.group.shape.result_rank
        out = local if result_rank == 0 else remote[result_rank - 1]
        device = self.group.local.dit.device
        return [v.to(device) for v in out]
