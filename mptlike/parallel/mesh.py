"""The data-parallel device mesh: how the ranks of the world split into replicas and shards.

`parallel.dp_shard` ranks hold one copy of the model between them (FSDP2 shards every parameter over
them); `parallel.dp_replicate` such groups each hold a copy (HSDP: gradients are reduce-scattered
within a group, then all-reduced across the groups). Every rank reads its own data, so the
data-parallel degree is always the whole world size, dp_replicate x dp_shard.

With dp_replicate=1 the mesh is one dimension ("dp_shard",), plain FSDP2; otherwise two,
("dp_replicate", "dp_shard"), which `fully_shard` reads as HSDP (replicate on the first, shard on
the last). Checkpoints do not depend on the mesh: DCP reshards on load (mptlike.train.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mptlike.errors import MptlikeError

REPLICATE, SHARD = "dp_replicate", "dp_shard"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MeshPlan:
    """The resolved mesh shape: dp_replicate x dp_shard == world size (build with `resolve_mesh`)."""

    dp_replicate: int = 1
    dp_shard: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    def describe(self) -> str:
        """One line for --dry-run and the logs."""
        shape = f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard}"
        if self.world_size == 1:
            return f"{shape} (one process: nothing sharded)"
        if not self.hsdp:
            return f"{shape} (FSDP2: every parameter sharded over all {self.dp_shard} ranks)"
        if self.dp_shard == 1:
            return f"{shape} (HSDP with groups of 1: every rank holds the whole model, gradients all-reduced)"
        return (f"{shape} (HSDP: shard within a group of {self.dp_shard}, replicate across {self.dp_replicate} "
                f"groups)")


def resolve_mesh(dp_replicate: int, dp_shard: int, world_size: int) -> MeshPlan:
    """parallel.dp_replicate / parallel.dp_shard (-1: the rest) against the world size, or one MptlikeError."""
    if dp_replicate < 1:
        raise MptlikeError(f"parallel.dp_replicate={dp_replicate} is invalid: use a positive integer (1: no "
                           f"replication, plain FSDP2)")
    if dp_shard == 0 or dp_shard < -1:
        raise MptlikeError(f"parallel.dp_shard={dp_shard} is invalid: use a positive integer, or -1 for the world "
                           f"size divided by parallel.dp_replicate")
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


def build_mesh(plan: MeshPlan, device_type: str) -> torch.distributed.device_mesh.DeviceMesh | None:
    """The DeviceMesh for `plan` over the default process group, or None for one process. Collective."""
    if plan.world_size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if not plan.hsdp:
        return init_device_mesh(device_type, (plan.dp_shard,), mesh_dim_names=(SHARD,))
    return init_device_mesh(device_type, (plan.dp_replicate, plan.dp_shard), mesh_dim_names=(REPLICATE, SHARD))
