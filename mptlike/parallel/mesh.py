"""The device mesh: how the ranks of the world split into replicas, shards and tensor-parallel groups.

`parallel.dp_shard` ranks hold one copy of the model between them (FSDP2 shards every parameter over
them); `parallel.dp_replicate` such groups each hold a copy (HSDP: gradients are reduce-scattered
within a group, then all-reduced across the groups). Every rank reads its own data, so the
data-parallel ranks read their own data.

With dp_replicate=1 the mesh is one dimension ("dp_shard",), plain FSDP2; otherwise two,
("dp_replicate", "dp_shard"), which `fully_shard` reads as HSDP (replicate on the first, shard on
the last). `parallel.tp` > 1 adds a last dimension, "tp": groups of tp consecutive ranks (one node's
fast links) split every block between them (mptlike.parallel.tensor_parallel) and read the same
data, so the data-parallel degree is the world size / tp. Checkpoints do not depend on the mesh:
DCP reshards on load (mptlike.train.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh

from mptlike.errors import MptlikeError

REPLICATE, SHARD, TP = "dp_replicate", "dp_shard", "tp"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MeshPlan:
    """The resolved mesh shape: dp_replicate x dp_shard x tp == world size (build with `resolve_mesh`)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads its own slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global `rank`: tp is the fastest-varying mesh dimension."""
        return rank // self.tp

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    def describe(self) -> str:
        """One line for --dry-run and the logs."""
        if self.tp > 1:
            return self._describe_tp()
        shape = f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard}"
        if self.world_size == 1:
            return f"{shape} (one process: nothing sharded)"
        if not self.hsdp:
            return f"{shape} (FSDP2: every parameter sharded over all {self.dp_shard} ranks)"
        if self.dp_shard == 1:
            return f"{shape} (HSDP with groups of 1: every rank holds the whole model, gradients all-reduced)"
        return (f"{shape} (HSDP: shard within a group of {self.dp_shard}, replicate across {self.dp_replicate} "
                f"groups)")

    def _describe_tp(self) -> str:
        shape = f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp}"
        tp = f"tensor parallel over groups of {self.tp} consecutive ranks, sequence parallel between them"
        if self.dp_size == 1:
            return f"{shape} ({tp}; no data parallelism)"
        if self.dp_replicate == 1:
            return f"{shape} ({tp}; FSDP2 over {self.dp_shard} such groups)"
        return (f"{shape} ({tp}; HSDP over {self.dp_size} such groups: shard within {self.dp_shard}, replicate "
                f"across {self.dp_replicate})")


def resolve_mesh(dp_replicate: int, dp_shard: int, world_size: int, tp: int = 1) -> MeshPlan:
    """parallel.dp_replicate / parallel.dp_shard (-1: the rest) / parallel.tp against the world size, or one
    MptlikeError."""
    if tp < 1:
        raise MptlikeError(f"parallel.tp={tp} is invalid: use a positive integer (1: no tensor parallelism)")
    if dp_replicate < 1:
        raise MptlikeError(f"parallel.dp_replicate={dp_replicate} is invalid: use a positive integer (1: no "
                           f"replication, plain FSDP2)")
    if dp_shard == 0 or dp_shard < -1:
        raise MptlikeError(f"parallel.dp_shard={dp_shard} is invalid: use a positive integer, or -1 for the world "
                           f"size divided by parallel.dp_replicate")
    if tp > 1:
        return _resolve_with_tp(dp_replicate, dp_shard, world_size, tp)
    divisors = ", ".join(map(str, _divisors(world_size)))
    if dp_shard == -1:
        if world_size % dp_replicate:
            raise MptlikeError(
                f"parallel.dp_replicate={dp_replicate} does not divide the world size {world_size} (trainer.devices "
                f"x trainer.num_nodes): use one of its divisors {divisors}")
        return MeshPlan(dp_replicate, world_size // dp_replicate)
    if dp_replicate * dp_shard != world_size:
        pairs = ", ".join(f"{d}x{world_size // d}" for d in _divisors(world_size))
        raise MptlikeError(
            f"parallel.dp_replicate x parallel.dp_shard = {dp_replicate} x {dp_shard} = {dp_replicate * dp_shard} "
            f"but the world size (trainer.devices x trainer.num_nodes) is {world_size}: use a pair whose product is "
            f"{world_size} ({pairs}), or parallel.dp_shard=-1")
    return MeshPlan(dp_replicate, dp_shard)


def _resolve_with_tp(dp_replicate: int, dp_shard: int, world_size: int, tp: int) -> MeshPlan:
    world = "the world size (trainer.devices x trainer.num_nodes)"
    if world_size % tp:
        raise MptlikeError(f"parallel.tp={tp} does not divide {world} {world_size}: use one of its divisors "
                           f"{', '.join(map(str, _divisors(world_size)))}")
    dp = world_size // tp
    if dp_shard == -1:
        if dp % dp_replicate:
            raise MptlikeError(
                f"parallel.dp_replicate={dp_replicate} does not divide the {dp} data-parallel ranks ({world} "
                f"{world_size} / parallel.tp={tp}): use one of {', '.join(map(str, _divisors(dp)))}")
        return MeshPlan(dp_replicate, dp // dp_replicate, tp)
    if dp_replicate * dp_shard * tp != world_size:
        pairs = ", ".join(f"{d}x{dp // d}" for d in _divisors(dp))
        raise MptlikeError(
            f"parallel.dp_replicate x parallel.dp_shard x parallel.tp = {dp_replicate} x {dp_shard} x {tp} = "
            f"{dp_replicate * dp_shard * tp} but {world} is {world_size}: with parallel.tp={tp} use a dp_replicate x "
            f"dp_shard pair whose product is {dp} ({pairs}), or parallel.dp_shard=-1")
    return MeshPlan(dp_replicate, dp_shard, tp)


def build_mesh(plan: MeshPlan, device_type: str) -> DeviceMesh | None:
    """The DeviceMesh for `plan` over the default process group, or None for one process. Collective."""
    if plan.world_size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if plan.tp > 1:
        return init_device_mesh(device_type, (plan.dp_replicate, plan.dp_shard, plan.tp),
                                mesh_dim_names=(REPLICATE, SHARD, TP))
    if not plan.hsdp:
        return init_device_mesh(device_type, (plan.dp_shard,), mesh_dim_names=(SHARD,))
    return init_device_mesh(device_type, (plan.dp_replicate, plan.dp_shard), mesh_dim_names=(REPLICATE, SHARD))


def data_parallel_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The part of a `build_mesh` mesh that FSDP2 (HSDP) shards over: ("dp_shard",) of one rank when tp is the
    whole world."""
    if mesh is None or TP not in (mesh.mesh_dim_names or ()):
        return mesh
    return mesh[REPLICATE, SHARD] if mesh[REPLICATE].size() > 1 else mesh[SHARD]
