"""Apply activation checkpointing, torch.compile and FSDP2 to a model from the outside.

The order is torchtitan's: swap the blocks' linear layers for float8 ones (parallel.float8), checkpoint
each block, compile each (checkpointed) block, then shard each block and finally the root. float8 first
means the checkpointing, compile and FSDP2 wrap the float8 layers; checkpointing next means the
recomputation sits inside the compiled region; sharding last means FSDP2's all-gather and reduce-scatter
hooks wrap everything else. Tensor parallelism (parallel.tp) comes before all of them, as in torchtitan:
the others wrap blocks whose layers are already split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mptlike.errors import MptlikeError
from mptlike.parallel.float8 import apply_float8, check_float8_recipe, uses_float8_all_gather
from mptlike.parallel.mesh import TP, data_parallel_mesh
from mptlike.parallel.tensor_parallel import apply_tensor_parallel

AC_MODES = ("none", "full", "every_k")
AcMode = Literal["none", "full", "every_k"]


@dataclass(frozen=True)
class ParallelPlan:
    """How to parallelize a model; validated here so inner code can trust it."""

    ac_mode: str = "none"  # none | full (every block) | every_k (every ac_every-th block)
    ac_every: int = 2
    compile: bool = False
    reshard_after_forward: bool = True  # True: ZeRO-3 (full sharding); False: keep params gathered until backward
    # Gradient accumulation: False reduce-scatters every micro-batch (gradients stay sharded); True
    # once per step, holding a full fp32 gradient per parameter on every rank in between.
    accumulate_unsharded: bool = False
    # float8 matmuls in the blocks' linear layers (mptlike.parallel.float8); all-gather null: float8 weights
    # under FSDP2 with tensorwise scaling.
    float8: bool = False
    float8_recipe: str = "tensorwise"
    float8_all_gather: bool | None = None

    def __post_init__(self) -> None:
        if self.ac_mode not in AC_MODES:
            raise MptlikeError(
                f"parallel.activation_checkpointing={self.ac_mode!r} is unknown: choose one of {', '.join(AC_MODES)}"
            )
        if self.ac_mode == "every_k" and self.ac_every < 1:
            raise MptlikeError(f"parallel.ac_every={self.ac_every} is invalid: use a positive integer")
        if self.float8:
            check_float8_recipe(self.float8_recipe, self.float8_all_gather)


def model_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks: the unit of checkpointing, compilation and sharding."""
    try:
        return model.transformer.blocks
    except AttributeError as exc:
        raise TypeError(f"{type(model).__name__} has no transformer.blocks to parallelize") from exc


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> int:
    """Wrap blocks so their activations are recomputed in backward; returns how many were wrapped."""
    if mode == "none":
        return 0
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model_blocks(model)
    step = 1 if mode == "full" else every
    wrapped = 0
    for i, block in enumerate(blocks):
        if i % step == 0:
            # Non-reentrant checkpointing works with keyword arguments, FSDP2 hooks and compile.
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)
            wrapped += 1
    return wrapped


def apply_compile(model: nn.Module) -> None:
    """Compile every block in place: `Module.compile` keeps parameter names free of `_orig_mod`."""
    for block in model_blocks(model):
        block.compile(fullgraph=False)


def apply_fsdp(
    model: nn.Module,
    mesh: torch.distributed.device_mesh.DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    reshard_after_forward: bool = True,
) -> None:
    """fully_shard each block, then the root (embeddings, final norm and any untied head).

    A 1-D mesh shards over all its ranks (FSDP2); a 2-D ("dp_replicate", "dp_shard") mesh is HSDP:
    parameters are sharded over the last dimension and replicated over the first
    (mptlike.parallel.mesh).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Keep the blocks' forward inputs as they come: the hidden states are bf16 already (the embedding is
    # gathered in bf16), and casting would also turn the fp32 ALiBi slopes into bf16 ones (off by up to
    # 1e-3 at 32 heads) and give every layer its own copy, so the shared sdpa bias would be rebuilt per layer.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    blocks = model_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keeping them
        # gathered saves one all-gather per step at the cost of one block's memory.
        reshard = reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    average_gradients_where_avg_sums(model, mesh)


def average_gradients_where_avg_sums(model: nn.Module,
                                     mesh: torch.distributed.device_mesh.DeviceMesh | None = None) -> bool:
    """Make FSDP2's gradient reduction a mean where the process group's AVG collectives sum.

    torch 2.6/2.7 reduce FSDP2 gradients with ReduceOp.AVG, which gloo (CPU) executes as a sum: every
    gradient comes out world_size times too large (Adam hides the scale, gradient clipping and the
    logged norm do not). One-element probes on the mesh's groups (the reduce-scatter within a shard
    group and, under HSDP, the all-reduce across replicas; the whole world when `mesh` is None) find
    the factor; a hook after the reduction (FSDP2 runs it after HSDP's all-reduce too) divides by it.
    Collective; returns whether the hook was installed.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    if "gloo" not in str(dist.get_backend()) or any(p.is_cuda for p in model.parameters()):
        return False
    if mesh is None or mesh.ndim == 1:
        shard_group, replicate_group = (None if mesh is None else mesh.get_group()), None
    else:
        replicate_group, shard_group = mesh.get_group(0), mesh.get_group(1)
    factor = 1
    shards = dist.get_world_size(shard_group)
    if shards > 1:
        probe = torch.empty(1)
        dist.reduce_scatter_tensor(probe, torch.ones(shards), op=dist.ReduceOp.AVG, group=shard_group)
        factor *= shards if probe.item() > 1.5 else 1
    if replicate_group is not None:
        probe = torch.ones(1)
        dist.all_reduce(probe, op=dist.ReduceOp.AVG, group=replicate_group)
        factor *= dist.get_world_size(replicate_group) if probe.item() > 1.5 else 1
    if factor == 1:
        return False
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(lambda grad: grad.div_(factor))
    return True


def parallelize(
    model: nn.Module,
    plan: ParallelPlan,
    *,
    mesh: torch.distributed.device_mesh.DeviceMesh | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """float8 linear layers, then activation checkpointing, then compile, then FSDP2 (HSDP on a 2-D mesh) when a
    mesh with more than one rank is given.

    The model may (and for large models should) still be on the meta device; materialize it
    afterwards with `mptlike.parallel.materialize`. With no mesh, or a mesh of one rank, nothing is
    sharded and mixed precision is left to autocast. A mesh with a "tp" dimension (parallel.tp > 1) first
    splits the blocks over it (mptlike.parallel.tensor_parallel); FSDP2 then shards over the rest, even
    when that is one rank, so that every parameter is a DTensor (torch's foreach optimizers refuse a
    mix of DTensors and plain tensors) and mixed precision works as under FSDP2.
    """
    tensor_parallel = mesh is not None and TP in (mesh.mesh_dim_names or ())
    if tensor_parallel:
        if plan.float8:
            # Swapping in float8 layers after the split would drop the layers' tensor-parallel hooks.
            raise MptlikeError("parallel.float8=true with parallel.tp > 1 is not supported yet: drop one of them")
        apply_tensor_parallel(model, mesh[TP])
        mesh = data_parallel_mesh(mesh)
    sharded = mesh is not None and (mesh.size() > 1 or tensor_parallel)
    if plan.float8:
        apply_float8(model_blocks(model), plan.float8_recipe,
                     all_gather=uses_float8_all_gather(plan.float8_recipe, plan.float8_all_gather, sharded=sharded))
    apply_activation_checkpointing(model, plan.ac_mode, plan.ac_every)
    if plan.compile:
        apply_compile(model)
    if sharded:
        apply_fsdp(
            model,
            mesh,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=plan.reshard_after_forward,
        )
    return model


# Path segments that module wrappers (activation checkpointing, torch.compile, FSDP1) add to names.
_WRAPPER_SEGMENTS = {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}


def unwrapped_name(name: str) -> str:
    """A parameter name as the plain model has it, whatever wrappers stood in between when it was saved."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
