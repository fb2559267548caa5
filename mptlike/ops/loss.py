"""Cross-entropy that never materializes an fp32 copy of the logits.

With a 50k vocabulary the logits are the largest activation of the model, and ``F.cross_entropy``
on bf16 logits keeps an fp32 log-softmax of them alive for backward. Here forward walks the rows in
chunks and keeps nothing but the loss; backward recomputes each chunk's softmax from the saved
(low-precision) logits and writes the gradient in the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# About 64 MiB of fp32 scratch per chunk: big enough to keep the GPU busy, small next to the logits.
_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(logits: Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        n_rows = logits.shape[0]
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = _chunk_rows(logits)
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            # F.cross_entropy is one fused log-softmax + gather; its fp32 result dies with the chunk.
            per_row = F.cross_entropy(logits[rows].float(), safe_targets[rows], reduction="none")
            total += torch.where(valid[rows], per_row, 0.0).sum()
        # Mean over the targets that count; with none, the loss is 0 rather than 0 / 0.
        n_valid = valid.sum().clamp_min(1).to(torch.float32)
        ctx.save_for_backward(logits, safe_targets, valid, n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, safe_targets, valid, n_valid = ctx.saved_tensors
        # d loss / d logits[r] = (softmax(logits[r]) - onehot(target[r])) * grad_out / n_valid for kept rows.
        row_scale = valid.to(torch.float32) * (grad_out.to(torch.float32) / n_valid)
        step = _chunk_rows(logits)
        chunks = []
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            probs = torch.softmax(logits[rows].float(), dim=-1)
            probs.scatter_add_(1, safe_targets[rows, None], torch.full_like(row_scale[rows, None], -1.0))
            probs.mul_(row_scale[rows, None])
            chunks.append(probs.to(logits.dtype))
        grad = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return grad, None, None


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over targets != ``ignore_index``; a float32 scalar (0 when every target is ignored).

    ``logits`` is ``(..., V)`` in any float dtype and ``targets`` the matching ``(...)`` int64 token ids,
    already shifted (``targets[..., i]`` is the token to predict at position ``i``).
    """
    vocab = logits.shape[-1]
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, vocab), targets.reshape(-1).long(), ignore_index)
