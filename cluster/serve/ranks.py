"""The DiTEngine replica's parallel mesh on Ray: ranks 1..N-1 as actors in its placement group.

A replica with ``parallel.cp_size x parallel.pp_size = N > 1`` reserves N bundles (Serve
``placement_group_bundles``, STRICT_PACK: one node; :func:`rank_bundles`). The replica itself
is rank 0 in bundle 0; :func:`start_rank_group` starts one :class:`cluster.engine.ranks.RankWorker`
actor per other bundle, then all N processes join one torch.distributed group (NCCL on CUDA,
gloo on CPU) through a TCP store on rank 0's node. :meth:`RayPeers.check` backs the replica's
Serve health check: a dead rank makes Serve replace the whole replica (a mesh cannot lose a rank). Outside a placement group (tests driving an
engine directly) the actors are placed by Ray's default scheduler.
"""

from __future__ import annotations

import asyncio
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


#: Concurrency group of :meth:`RankActor.alive`: a health check is answered while a forward runs.
HEALTH_GROUP = "health"


class RankActor(RankWorker):
    """:class:`cluster.engine.ranks.RankWorker` as a Ray actor. Model and pool calls run in the
    default concurrency group (one at a time, in submission order); :meth:`alive` runs in its
    own group, so a health check does not wait behind a long forward."""

    @ray.method(concurrency_group=HEALTH_GROUP)
    def alive(self) -> int:
        return self.mesh.rank


_REMOTE_RANK = ray.remote(concurrency_groups={HEALTH_GROUP: 1})(RankActor)


class RayCall:
    """Object refs of one operation on every peer (:class:`cluster.engine.ranks.PeerCall`)."""

    def __init__(self, refs: list[ray.ObjectRef]):
        self.refs = refs

    def wait(self) -> list[Any]:
        return ray.get(self.refs)


class RayPeers:
    """Ranks 1..N-1 as Ray actors (:class:`cluster.engine.ranks.Peers`). With several peers the
    arguments are put in the object store once and shared by all of them."""

    def __init__(self, actors: list[Any]):
        self.actors = actors

    def launch(self, method: str, *args: Any) -> RayCall:
        if len(self.actors) > 1:  # serialise once for every peer
            args = tuple(ray.put(a) for a in args)
        return RayCall([getattr(actor, method).remote(*args) for actor in self.actors])

    def launch_each(self, method: str, args: Sequence[tuple]) -> RayCall:
        return RayCall([getattr(actor, method).remote(*a) for actor, a in zip(self.actors, args)])

    async def check(self, timeout_s: float) -> None:
        """Every peer answers :meth:`RankActor.alive` within ``timeout_s`` seconds.

        Raises:
            RuntimeError: a rank died or did not answer (the message names it); the replica's
                mesh is broken and the replica must be replaced (Serve does it when the
                deployment's ``check_health`` raises).
        """
        for rank, actor in enumerate(self.actors, start=1):
            try:
                await asyncio.wait_for(actor.alive.remote(), timeout_s)
            except Exception as exc:  # noqa: BLE001 - RayActorError, timeout, ...
                raise RuntimeError(f"DiT mesh rank {rank} is not answering: {type(exc).__name__}: {exc}") from exc

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
    return _REMOTE_RANK.options(**options)
