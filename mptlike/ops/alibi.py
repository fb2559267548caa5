"""ALiBi: per-head linear position biases (Press et al. 2021) as MPT defines them.

Head h adds ``slope[h] * (key_pos - query_pos)`` to its attention scores, so farther keys are
penalized linearly and no position embedding is needed. Backends that can apply the bias from the
slopes alone (flex, flash) never build the ``(H, Sq, Sk)`` tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0, device: torch.device | str | None = None) -> Tensor:
    """Per-head ALiBi slopes, shape ``(n_heads,)`` float32, in MPT's order.

    The slopes form a geometric sequence ``2**-(alibi_bias_max * i / n)`` for the next power of two
    ``n >= n_heads``. When ``n_heads`` is not a power of two, MPT takes the odd-indexed slopes of that
    longer sequence first and then the even-indexed ones, so the kept heads still span the whole range
    of slopes instead of only its steep end.
    """
    n = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, n + 1, dtype=torch.float32, device=device) * (alibi_bias_max / n)
    slopes = torch.pow(2.0, -m)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def alibi_bias(
    slopes: Tensor,
    q_len: int,
    k_len: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Additive bias ``(1, H, q_len, k_len)``: ``slopes[h] * (key_pos - query_pos)``.

    Queries sit at the end of the keys (query ``i`` is at absolute position ``k_len - q_len + i``),
    which is where they are both in training (``q_len == k_len``) and in KV-cache decoding.
    The product is formed in float32 and cast once, so a low-precision ``dtype`` rounds only the
    result (bf16 cannot even hold the distances beyond 256 exactly).
    """
    device = slopes.device if device is None else device
    slopes = slopes.to(device=device, dtype=torch.float32)
    key_pos = torch.arange(k_len, device=device, dtype=torch.float32)
    query_pos = torch.arange(k_len - q_len, k_len, device=device, dtype=torch.float32)
    distance = key_pos[None, :] - query_pos[:, None]  # (q_len, k_len), <= 0 on and below the diagonal
    if dtype == torch.float32:
        return (slopes[:, None, None] * distance[None]).unsqueeze(0)
    # One head at a time, so a long-sequence bf16 bias never needs an fp32 copy of all heads.
    bias = torch.empty(1, slopes.shape[0], q_len, k_len, device=device, dtype=dtype)
    for head, slope in enumerate(slopes):
        bias[0, head] = slope * distance
    return bias
