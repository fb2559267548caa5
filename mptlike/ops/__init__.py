"""Kernels: ALiBi, attention backends, low-precision LayerNorm, memory-lean cross-entropy."""

from mptlike.ops.alibi import alibi_bias, alibi_slopes, causal_alibi_bias
from mptlike.ops.attention import ATTN_CHOICES, ATTN_IMPLS, attention, check_attn_impl, resolve_attn_impl
from mptlike.ops.layernorm import LPLayerNorm
from mptlike.ops.loss import cross_entropy

__all__ = [
    "ATTN_CHOICES",
    "ATTN_IMPLS",
    "LPLayerNorm",
    "alibi_bias",
    "alibi_slopes",
    "attention",
    "causal_alibi_bias",
    "check_attn_impl",
    "cross_entropy",
    "resolve_attn_impl",
]
