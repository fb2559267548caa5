"""ALiBi: per-head linear position biases (Press et al. 2021) as MPT defines them.

Head h adds ``slope[h] * (key_pos - query_pos)`` to its attention scores, so farther keys are
penalized linearly and no position embedding is needed. Backends that can apply the bias from the
slopes alone (flex, flash, triton) never build the ``(H, Sq, Sk)`` tensor; sdpa needs it, and gets
one per forward (`causal_alibi_bias`), shared by every layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


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
    One broadcast multiply for all heads, written straight into ``dtype``: the product is formed in
    float32 and rounded once (bf16 cannot even hold the distances beyond 256 exactly), and on GPU no
    float32 copy of all heads is ever allocated.
    """
    device = slopes.device if device is None else device
    slopes = slopes.to(device=device, dtype=torch.float32)
    key_pos = torch.arange(k_len, device=device, dtype=torch.float32)
    query_pos = torch.arange(k_len - q_len, k_len, device=device, dtype=torch.float32)
    distance = key_pos[None, :] - query_pos[:, None]  # (q_len, k_len), <= 0 on and below the diagonal
    bias = torch.empty(1, slopes.shape[0], q_len, k_len, device=device, dtype=dtype)
    torch.mul(slopes[:, None, None], distance, out=bias[0])
    return bias


# Per slopes tensor, held weakly (an entry goes when its slopes do), the causal biases built for it.
# MPTModel computes the slopes once per forward and hands the same tensor to every layer, so the
# layers of one forward share one bias, and autograd saves that one for backward, not one per layer.
_CAUSAL_BIASES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def causal_alibi_bias(slopes: Tensor, q_len: int, k_len: int, *, dtype: torch.dtype) -> Tensor:
    """`alibi_bias` on the slopes' device with ``-inf`` right of the causal diagonal: sdpa's whole mask.

    Cached per (slopes tensor, q_len, k_len, dtype) while the slopes live: treat it as read-only.
    """
    if torch.compiler.is_compiling():  # a compiled graph builds it once per graph anyway
        return _causal_bias(slopes, q_len, k_len, dtype)
    built = _CAUSAL_BIASES.get(slopes)
    if built is None:
        built = _CAUSAL_BIASES[slopes] = {}
    key = (q_len, k_len, dtype)
    if key not in built:
        built[key] = _causal_bias(slopes, q_len, k_len, dtype)
    return built[key]


def _causal_bias(slopes: Tensor, q_len: int, k_len: int, dtype: torch.dtype) -> Tensor:
    bias = alibi_bias(slopes, q_len, k_len, dtype=dtype)
    key_pos = torch.arange(k_len, device=slopes.device)
    query_pos = torch.arange(k_len - q_len, k_len, device=slopes.device)
    return bias.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
