"""The DiTEngine replica's parallel mesh on Ray: ranks 1..N-1 as actors in its placement group.

A replica with ``parallel.cp_size x parallel.pp_size = N > 1`` reserves N bundles (Serve
``placement_group_bundles``, STRICT_PACK: one node; :func:`rank_bundles`). The replica itself
is rank 0 in bundle 0; :func:`start_rank_group` starts one :class:`cluster.engine.ranks.RankWorker`
actor per other bundle, then all N processes join one torch.distributed group (NCCL on CUDA,
gloo on CPU) through a TCP store on rank 0's node. Outside a placement group (tests driving an
engine directly) the actors are placed by Ray's default scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import DeploymentSettings, ParallelSettings
from cluster.engine.ranks import RankGroup, RankSpec, RankWorker
from stages.config import ModelConfig
from stages.parallel.mesh import MeshShape, free_tcp_init_method

log = logging.getLogger(__name__)


class RayCall:
    """Object refs of one operation on every peer (:class:`cluster.engine.ranks.PeerCall`)."""

    def __init__(self, refs: list[ray.ObjectRef]):
        self.refs = refs

    def wait(self) -> list[Any]:
        return ray.get(self.refs)


class RayPeers:
    """Ranks 1..N-1 as Ray actors (:class:`cluster.engine.ranks.Peers`). Arguments are put in
    the object store once and shared by every peer."""

    def __init__(self, actors: list[Any]):
        self.actors = actors

    def launch(self, method: str, *args: Any) -> RayCall:
        refs = [ray.put(a) for a in args]
        return RayCall([getattr(actor, method).remote(*refs) for actor in self.actors])

    def launch_each(self, method: str, args: Sequence[tuple]) -> RayCall:
        return RayCall([getattr(actor, method).remote(*a) for actor, a in zip(self.actors, args)])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def rank_bundles(parallel: ParallelSettings, settings: DeploymentSettings) -> list[dict[str, float]] | None:
    """Serve ``placement_group_bundles`` of a DiTEngine replica: one bundle per rank (the
    replica's own resources), or None without parallelism."""
    if parallel.world_size == 1:
        return None
    bundle = {"CPU": settings.num_cpus}
    if settings.num_gpus:
        bundle["GPU"] = settings.num_gpus
    return [dict(bundle) for _ in range(parallel.world_size)]


def _backend(parallel: ParallelSettings, device: str) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if device.startswith("cuda") else "gloo"


def start_rank_group(parallel: ParallelSettings, settings: DeploymentSettings, model_cfg: ModelConfig, dit_dir: str,
                     device: str = "cpu", dtype: str = "float32", torch_threads: int | None = None,
                     attention: str = "sdpa") -> RankGroup:
    """Start ranks 1..N-1 as actors, join the mesh as rank 0 and load rank 0's shard.

    Args:
        parallel: cp_size / pp_size / backend / micro_batches / init_timeout_s.
        settings: the DiTEngine deployment's resources (per rank: num_cpus, num_gpus).
        model_cfg, dit_dir: the model and its DiT checkpoint folder.
        device, dtype: where and in which dtype every rank holds its shard.
        torch_threads: torch intra-op threads of each peer process (None: Ray's default).
        attention: range-attention backend of every rank (auto, sdpa, flash).

    Raises:
        ValueError: a mesh the model cannot be split into (named field), see
            :func:`stages.parallel.mesh.init_mesh`.
        ray.exceptions.RayActorError: a rank failed to start (its error is chained).
    """
    shape = MeshShape(parallel.cp_size, parallel.pp_size)
    init_method = free_tcp_init_method(ray.util.get_node_ip_address())
    common = dict(model_cfg=model_cfg, dit_dir=str(dit_dir), shape=shape, init_method=init_method,
                  backend=_backend(parallel, device), device=device, dtype=dtype,
                  micro_batches=parallel.micro_batches, timeout_s=parallel.init_timeout_s,
                  torch_threads=torch_threads, attention=attention)
    actors = [_rank_actor(r, settings).remote(RankSpec(rank=r, **common))
              for r in range(1, shape.world_size)]
    group = RankGroup(RankWorker(RankSpec(rank=0, **common)), RayPeers(actors))
    try:
        RayPeers(actors).launch("ready").wait()
    except Exception:
        group.close()
        raise
    log.info("DiT mesh up: cp_size %d x pp_size %d on %s (%s)", shape.cp_size, shape.pp_size, device,
             common["backend"])
    return group


def _rank_actor(rank: int, settings: DeploymentSettings):
    options: dict[str, Any] = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}
    pg = get_current_placement_group()
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank, placement_group_capture_child_tasks=False)
    return ray.remote(RankWorker).options(**options)
