"""The end of every optimizer step, the same for both backends.

One all-reduce carries the mean loss and whether any rank was signalled (so all ranks stop at the
same step, at no extra collective), then the global gradient norm is taken and clipped. The three
numbers come back as Python floats, the same on every rank, which is what the guard decides on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mptlike.parallel.tensor_parallel import clip_grad_norm, spans_meshes


def reduce_and_clip(model: nn.Module, loss_sum: torch.Tensor, *, micro_batches: int, stop_requested: bool,
                    grad_clip: float) -> tuple[float, float, bool]:
    """(mean loss over the global batch, gradient norm before clipping, whether any rank must stop)."""
    packed = torch.stack([loss_sum / micro_batches, torch.tensor(float(stop_requested), device=loss_sum.device)])
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(packed)
        packed[0] /= world
    params = [p for p in model.parameters() if p.grad is not None]
    if spans_meshes([p.grad for p in params]):
        # Tensor parallelism: the blocks on the dp x tp mesh, the embeddings on the dp mesh only, which torch's
        # clip_grad_norm_ cannot reduce together.
        norm = clip_grad_norm(params, grad_clip)
    elif grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # Under FSDP2 the norm is a DTensor holding partial sums: full_tensor() all-reduces it.
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    loss, stop = packed.tolist()  # a CPU-GPU sync point, once per step
    return loss, norm.item(), stop > 0
