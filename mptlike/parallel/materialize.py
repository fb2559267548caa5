"""Turn a meta-device (possibly sharded) model into real, initialized parameters.

Two ways, chosen by `init`:
  sharded  every rank allocates only its own shards and `init_weights()` fills them in place. Nothing
           is ever whole on one rank, so this is what large models use. The weights are a function
           of the seed and the sharding, not of the seed alone: they differ from a one-device init
           and change with the world size (each shard has the right distribution, nothing more).
           On CUDA, DTensor's offset-based RNG tracker gives each shard its own stretch of one
           Philox stream, so shards differ from each other, but a shard's values are not the
           full-tensor draw at its positions (kernels draw per thread, and the launch depends on
           the tensor's size). On CPU there is no such tracker: every rank, seeded alike, draws its
           shard from the start of the same stream, so the shards of one tensor repeat each other.
           Under tensor parallelism the weights a group shares (embeddings, norms) are then
           broadcast from its first rank, so they are equal within the group whatever was drawn.
  rank0    rank 0 builds and initializes the full model on CPU, then broadcasts it into the shards.
           The weights are then the same at every world size (what the CPU tests compare), at the
           price of one full copy in rank 0's memory: fine for small models only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from mptlike.errors import MptlikeError
from mptlike.parallel.tensor_parallel import full_state_to_tp_order, replicate_over_tp, tensor_parallel_mesh

INIT_MODES = ("auto", "sharded", "rank0")


def resolve_init_mode(mode: str, device: torch.device, world_size: int) -> str:
    if mode not in INIT_MODES:
        raise MptlikeError(f"parallel.init={mode!r} is unknown: choose one of {', '.join(INIT_MODES)}")
    if mode != "auto":
        return mode
    if world_size > 1 and device.type == "cpu":
        return "rank0"
    return "sharded"


def _init_in_place(model: nn.Module, seed: int) -> None:
    # Seeding right before init makes the weights a function of (seed, config) alone, however
    # much randomness was consumed earlier (data prep, Lightning setup, ...).
    torch.manual_seed(seed)
    model.init_weights()


@torch.no_grad()
def materialize(
    model: nn.Module,
    device: torch.device,
    *,
    seed: int,
    init: str = "sharded",
    build_full: Callable[[], nn.Module] | None = None,
) -> None:
    """Allocate `model`'s parameters on `device` and initialize them (see the module docstring).

    `build_full` builds an unsharded copy of the model on the meta device; it is needed for
    init="rank0" only.
    """
    model.to_empty(device=device)
    _init_in_place(model, seed)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if init != "rank0":
        tp_mesh = tensor_parallel_mesh(model)
        if tp_mesh is not None:
            replicate_over_tp(model, tp_mesh)  # the weights a tensor-parallel group shares start equal
        return
    if build_full is None:
        raise ValueError("init='rank0' needs build_full to construct the unsharded model")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full_state: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        full = build_full()
        full.to_empty(device="cpu")
        _init_in_place(full, seed)
        full_state = full_state_to_tp_order(model, full.state_dict())
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
