"""Cross-entropy that never materializes an fp32 copy of the logits.

With a 50k vocabulary the logits are the largest activation of the model, and ``F.cross_entropy``
on bf16 logits keeps an fp32 log-softmax of them alive for backward. Here forward walks the rows in
chunks, keeping one fp32 log-sum-exp per row; backward recomputes each chunk's softmax from the
saved (low-precision) logits and that log-sum-exp, and writes the gradient in the logits' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

# About 64 MiB of fp32 scratch per chunk: big enough to keep the GPU busy, small next to the logits.
_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        n_rows, vocab = logits.shape
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = _chunk_rows(vocab)
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            chunk = logits[rows].float()
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            target_logit = chunk.gather(1, safe_targets[rows, None]).squeeze(1)
            total += torch.where(valid[rows], lse[rows] - target_logit, 0.0).sum()
        # Mean over the targets that count; with none, the loss is 0 rather than 0 / 0.
        n_valid = valid.sum().clamp_min(1).to(torch.float32)
        ctx.save_for_backward(logits, safe_targets, valid, lse, n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, safe_targets, valid, lse, n_valid = ctx.saved_tensors
        n_rows, vocab = logits.shape
        grad = torch.empty_like(logits)
        # d loss / d logits[r] = (softmax(logits[r]) - onehot(target[r])) * grad_out / n_valid for kept rows.
        row_scale = valid.to(torch.float32) * (grad_out.to(torch.float32) / n_valid)
        step = _chunk_rows(vocab)
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            probs = torch.exp(logits[rows].float() - lse[rows, None])
            probs.scatter_add_(1, safe_targets[rows, None], torch.full_like(lse[rows, None], -1.0))
            grad[rows] = (probs * row_scale[rows, None]).to(logits.dtype)
        return grad, None, None


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over targets != ``ignore_index``; a float32 scalar (0 when every target is ignored).

    ``logits`` is ``(..., V)`` in any float dtype and ``targets`` the matching ``(...)`` int64 token ids,
    already shifted (``targets[..., i]`` is the token to predict at position ``i``).
    """
    vocab = logits.shape[-1]
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, vocab), targets.reshape(-1).long(), ignore_index)
