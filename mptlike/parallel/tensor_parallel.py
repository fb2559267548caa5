"""Tensor parallelism with sequence parallelism for the MPT block (Megatron-LM's layout), from outside the model.

The `parallel.tp` ranks of a tensor-parallel group split every block between them:

    residual stream  sharded over the sequence (Shard(1)): norm_1, norm_2, the residual dropouts and
                     the additions run on this rank's tokens only (sequence parallelism)
    attention        the normed input is all-gathered to the whole sequence; Wqkv is split by
                     columns so that this rank computes whole heads of q, k and v (GQA: whole kv
                     heads); attention runs on those heads with their ALiBi slopes; out_proj is
                     split by rows and its partial sums are reduce-scattered onto the sequence shards
    MLP              the same: all-gathered input, up_proj by columns, GELU on this rank's columns,
                     down_proj by rows, reduce-scattered

The embeddings stay whole on every rank of the group (FSDP2 shards them over the data-parallel
ranks only). The embedding's output is cut to this rank's tokens at `emb_drop` (so embedding
dropout draws once per token), and norm_f's output is all-gathered back to the whole sequence, so
the tied head, the logits and the loss are the one-device code. The gradients of those replicated
parameters come out the same on every rank of the group and equal to one device's: the cut's
backward all-gathers the gradient of the embedding's output, and every rank takes the head's
gradient from the same whole-sequence loss. (Splitting the vocabulary, "loss parallel", is not
built: it would shard the largest activation, the logits, at the price of a vocab-parallel
embedding and a loss written against DTensor.)

Wqkv is one fused matrix whose rows are MPT's [q heads; k heads; v heads]. DTensor splits rows into
contiguous chunks, so at parallelize time the rows are permuted into [q, k, v heads of rank 0;
q, k, v heads of rank 1; ...] and rank r's chunk holds its heads of all three. The permutation
exists only inside the running model: every state that leaves or enters it (checkpoints with the
optimizer's moments, full state dicts for init, init_from and the export) is converted to or from
MPT's order here, so checkpoints and exported weights do not depend on the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.weak import WeakIdKeyDictionary

from mptlike.errors import MptlikeError
from mptlike.model import MPTConfig
from mptlike.parallel.mesh import TP

_WQKV = ("attn.Wqkv.weight", "attn.Wqkv.bias")


def valid_tp_degrees(cfg: MPTConfig, world_size: int) -> list[int]:
    """The tensor-parallel degrees that divide the world and split this model into whole heads."""
    return [t for t in range(1, world_size + 1)
            if world_size % t == 0 and cfg.n_heads % t == 0 and cfg.kv_n_heads % t == 0
            and cfg.ffn_hidden_size % t == 0]


def check_tensor_parallel(cfg: MPTConfig, tp: int, world_size: int) -> None:
    """Refuse, with one MptlikeError, a model that parallel.tp cannot split (before any process group starts)."""
    if tp == 1:
        return
    fits = ", ".join(map(str, valid_tp_degrees(cfg, world_size)))
    if cfg.n_heads % tp:
        raise MptlikeError(f"parallel.tp={tp} does not divide model.n_heads={cfg.n_heads}: every rank computes whole "
                           f"heads; use parallel.tp in {fits}")
    if cfg.kv_n_heads % tp:
        raise MptlikeError(f"parallel.tp={tp} does not divide model.kv_n_heads={cfg.kv_n_heads} (grouped-query "
                           f"attention: every rank holds whole kv heads); use parallel.tp in {fits}")
    if cfg.ffn_hidden_size % tp:
        raise MptlikeError(f"parallel.tp={tp} does not divide the MLP width {cfg.ffn_hidden_size} (model.d_model x "
                           f"model.expansion_ratio); use parallel.tp in {fits}")
    if cfg.qk_ln:
        raise MptlikeError(f"model.qk_ln=true with parallel.tp={tp}: its LayerNorms span all heads, which tensor "
                           f"parallelism splits over ranks; use parallel.tp=1 (FSDP2 or HSDP shard it instead)")


# ---------------------------------------------------------------------------------------------
# Wqkv's row order


@dataclass(frozen=True)
class QkvLayout:
    """Wqkv's rows under tensor parallelism: heads of n_heads (q) and kv_n_heads (k, v) split over tp ranks."""

    n_heads: int
    kv_n_heads: int
    head_dim: int
    tp: int

    def tp_order(self) -> Tensor:
        """Row i of the tensor-parallel layout is row tp_order()[i] of MPT's [q; k; v] layout."""
        q_rows, kv_rows = self.n_heads * self.head_dim, self.kv_n_heads * self.head_dim
        q_per, kv_per = q_rows // self.tp, kv_rows // self.tp
        rows = torch.arange(q_rows + 2 * kv_rows)
        q, k, v = rows.split((q_rows, kv_rows, kv_rows))
        return torch.cat([torch.cat([q[r * q_per:(r + 1) * q_per], k[r * kv_per:(r + 1) * kv_per],
                                     v[r * kv_per:(r + 1) * kv_per]]) for r in range(self.tp)])

    def canonical_order(self) -> Tensor:
        """Row j of MPT's layout is row canonical_order()[j] of the tensor-parallel one (the inverse permutation)."""
        return torch.argsort(self.tp_order())


def is_wqkv(name: str) -> bool:
    """Whether a (canonical) state-dict name is a fused qkv weight or bias, the tensors whose rows TP permutes."""
    return name.endswith(_WQKV)


def tensor_parallel_mesh(model: nn.Module) -> DeviceMesh | None:
    """The 1-D mesh `model`'s blocks are split over (read off a parameter), or None without tensor parallelism."""
    try:
        weight = model.transformer.blocks[0].attn.Wqkv.weight
    except (AttributeError, IndexError, TypeError):  # not an MPT model (or one without blocks): nothing split
        return None
    names = weight.device_mesh.mesh_dim_names if isinstance(weight, DTensor) else None
    if not names or TP not in names or weight.device_mesh.size(names.index(TP)) == 1:
        return None
    return weight.device_mesh[TP]


def qkv_layout(model: nn.Module) -> QkvLayout | None:
    """The layout of `model`'s Wqkv rows when tensor parallelism split them, else None."""
    mesh = tensor_parallel_mesh(model)
    if mesh is None:
        return None
    cfg = model.config
    return QkvLayout(cfg.n_heads, cfg.kv_n_heads, cfg.head_dim, mesh.size())


# ---------------------------------------------------------------------------------------------
# applying the plan


def _block_plan() -> dict[str, Any]:
    """Per block: see the module docstring. The residual stream between modules is a DTensor sharded on
    the sequence, which carries its global length (sequences need not divide by tp)."""
    # attn(x, slopes, sequence_id, past, use_cache): only x changes layout.
    rest = (None, None, None, None)
    return {
        "norm_1": SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest),
                                   use_local_output=False),
        "attn.Wqkv": ColwiseParallel(),
        "attn.out_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "resid_attn_dropout": SequenceParallel(),
        "norm_2": SequenceParallel(),
        "ffn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                  use_local_output=False),
        "ffn.up_proj": ColwiseParallel(),
        "ffn.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "resid_ffn_dropout": SequenceParallel(),
    }


class _RankSlopes:
    """A forward pre-hook on MPTAttention: the ALiBi slopes argument cut to this rank's heads.

    MPTModel hands every layer the same slopes tensor, and sdpa's causal ALiBi mask is cached per
    slopes tensor (mptlike.ops.alibi): so every layer gets the same cut, made once per forward."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self._cut: WeakIdKeyDictionary = WeakIdKeyDictionary()  # full slopes -> this rank's (a copy, not a view)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        slopes = args[1]
        if slopes is None:
            return args
        if torch.compiler.is_compiling():  # a compiled graph builds its mask once anyway
            mine = slopes[self.first:self.first + self.count]
        else:
            mine = self._cut.get(slopes)
            if mine is None:
                mine = self._cut[slopes] = slopes[self.first:self.first + self.count].clone()
        return (args[0], mine, *args[2:])


@torch.no_grad()
def _permute_rows(linear: nn.Linear, order: Tensor) -> None:
    for param in (linear.weight, linear.bias):
        if param is not None and not param.is_meta:
            param.copy_(param.index_select(0, order.to(param.device)))


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every block of `model` over `tp_mesh` (1-D), in place; before checkpointing, compile and FSDP2.

    On the meta device nothing is permuted (there are no values yet); real weights have Wqkv's rows
    permuted first, so the model computes what it did before.
    """
    cfg: MPTConfig = model.config
    tp = tp_mesh.size()
    check_tensor_parallel(cfg, tp, tp)
    layout = QkvLayout(cfg.n_heads, cfg.kv_n_heads, cfg.head_dim, tp)
    heads = cfg.n_heads // tp
    slopes = _RankSlopes(tp_mesh.get_local_rank() * heads, heads)
    for block in model.transformer.blocks:
        _permute_rows(block.attn.Wqkv, layout.tp_order())
        parallelize_module(block, tp_mesh, _block_plan())
        block.attn.register_forward_pre_hook(slopes)
    parallelize_module(model.transformer, tp_mesh, {
        # Cut the (replicated) embedding output to this rank's tokens; the backward all-gathers its gradient.
        "emb_drop": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                       use_local_output=False),
        "norm_f": SequenceParallel(),
    })
    # MPTModel returns (hidden, presents): the whole sequence's hidden states, as a plain tensor, to the head.
    parallelize_module(model.transformer, tp_mesh, PrepareModuleOutput(
        output_layouts=(Shard(1), None), desired_output_layouts=(Replicate(), None), use_local_output=True))


@torch.no_grad()
def replicate_over_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Make every parameter that tensor parallelism does not split equal on all ranks of the group (rank 0's).

    For weights each rank initialized itself (parallel.init=sharded): ranks draw their own random
    numbers, and a replicated weight must not differ within the group. Collective over the group.
    """
    group = tp_mesh.get_group()
    source = dist.get_global_rank(group, 0)
    for param in model.parameters():
        if isinstance(param, DTensor):
            names = param.device_mesh.mesh_dim_names or ()
            if TP in names and param.placements[names.index(TP)].is_shard():
                continue
            param = param.to_local()
        dist.broadcast(param, src=source, group=group)


# ---------------------------------------------------------------------------------------------
# states in MPT's order


def _reorder_full_state(state: dict[str, Tensor], order: Tensor) -> dict[str, Tensor]:
    return {k: v.index_select(0, order.to(v.device)) if is_wqkv(k) else v for k, v in state.items()}


def full_state_to_tp_order(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A full (whole-tensor) state dict in MPT's order, as `model` holds it: for set_model_state_dict."""
    layout = qkv_layout(model)
    return state if layout is None else _reorder_full_state(state, layout.tp_order())


def full_state_to_canonical(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A full state dict of `model` (from get_model_state_dict) in MPT's order; entries may be absent (other ranks)."""
    layout = qkv_layout(model)
    return state if layout is None else _reorder_full_state(state, layout.canonical_order())


def _reordered(tensor: DTensor, index: Tensor) -> DTensor:
    """`tensor` with its rows reordered (row i of the result is row index[i]), sharded as `tensor` is.

    One whole tensor exists at a time on each rank (the all-gather's result), then only this rank's part."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    whole = tensor.full_tensor().index_select(0, index.to(tensor.device))
    shape, offset = compute_local_shape_and_global_offset(whole.shape, tensor.device_mesh, tensor.placements)
    local = whole[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))].clone()
    return DTensor.from_local(local, tensor.device_mesh, tensor.placements, run_check=False, shape=whole.shape,
                              stride=whole.stride())


def _reorder_states(model_state: dict[str, Any], optim_state: dict[str, Any] | None,
                    index: Tensor) -> tuple[dict[str, Any], dict[str, Any] | None]:
    model_state = {k: _reordered(v, index) if is_wqkv(k) else v for k, v in model_state.items()}
    if optim_state is not None and "state" in optim_state:
        # {"state": {name: {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}}, "param_groups": [...]}: the
        # moments are sharded like their parameter; the step count is a plain scalar.
        per_param = {name: {key: _reordered(v, index) if is_wqkv(name) and isinstance(v, DTensor) and v.ndim else v
                            for key, v in values.items()}
                     for name, values in optim_state["state"].items()}
        optim_state = {**optim_state, "state": per_param}
    return model_state, optim_state


def canonical_sharded_state(model: nn.Module, model_state: dict[str, Any], optim_state: dict[str, Any] | None = None
                            ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """get_state_dict's (sharded) model and optimizer states with Wqkv's rows (and moments) in MPT's order,
    for a checkpoint any layout can load. Collective; the inputs are left as they are."""
    layout = qkv_layout(model)
    if layout is None:
        return model_state, optim_state
    return _reorder_states(model_state, optim_state, layout.canonical_order())


def sharded_state_from_canonical(model: nn.Module, model_state: dict[str, Any],
                                 optim_state: dict[str, Any] | None = None
                                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The inverse of `canonical_sharded_state`: states a checkpoint filled in MPT's order, in `model`'s
    (for set_state_dict). Collective."""
    layout = qkv_layout(model)
    if layout is None:
        return model_state, optim_state
    return _reorder_states(model_state, optim_state, layout.tp_order())


# ---------------------------------------------------------------------------------------------
# gradients on several meshes


def spans_meshes(tensors: list[Tensor]) -> bool:
    """Whether `tensors` are DTensors on more than one mesh, or DTensors next to plain tensors, as under
    tensor parallelism: torch's clip_grad_norm_ cannot reduce those together."""
    meshes = {t.device_mesh if isinstance(t, DTensor) else None for t in tensors}
    return len(meshes) > 1


def total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all `grads` together, every element counted once, as a plain fp32 scalar.

    A DTensor's local part is held by the ranks of its mesh that it is replicated over and by every
    instance of its mesh in the world (a DTensor on the data-parallel mesh is repeated on every
    tensor-parallel rank); a plain tensor by every rank. Each rank adds its squares divided by that
    count, and one all-reduce sums them. Collective.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        copies = world
        if isinstance(grad, DTensor):  # never partial: FSDP2 (always present under tp) reduced it
            mesh = grad.device_mesh
            copies = world // mesh.size() * math.prod(
                mesh.size(i) for i, p in enumerate(grad.placements) if p.is_replicate())
            grad = grad.to_local()
        squares += torch.linalg.vector_norm(grad, dtype=torch.float32).double() ** 2 / copies
    if world > 1:
        dist.all_reduce(squares)
    return squares.sqrt().float()


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ for gradients on several meshes (`total_norm`); max_norm <= 0 only measures."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = total_norm(grads)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grad in grads:
            (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(scale.to(grad.device))
    return norm
