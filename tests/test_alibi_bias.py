"""The dense ALiBi bias that sdpa needs: built without a loop over heads, and once per forward, not per layer."""

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.ops import alibi
from mptlike.ops.alibi import alibi_bias, alibi_slopes, causal_alibi_bias


class CountKernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _kernels_to_build(n_heads, dtype):
    slopes = alibi_slopes(n_heads)
    with CountKernels() as counter:
        alibi_bias(slopes, 16, 16, dtype=dtype)
    return counter.count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_is_built_with_the_same_kernels_for_4_or_64_heads(dtype):
    assert _kernels_to_build(64, dtype) == _kernels_to_build(4, dtype)


@pytest.mark.parametrize("q_len,k_len", [(6, 6), (1, 9), (3, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_bias_is_the_bias_with_minus_infinity_right_of_the_diagonal(q_len, k_len, dtype):
    slopes = alibi_slopes(6)
    got = causal_alibi_bias(slopes, q_len, k_len, dtype=dtype)
    want = alibi_bias(slopes, q_len, k_len).to(dtype)
    future = torch.arange(k_len)[None, :] > torch.arange(k_len - q_len, k_len)[:, None]
    want = want.masked_fill(future, float("-inf"))
    assert got.dtype == dtype and torch.equal(got, want)


def test_causal_bias_is_cached_per_slopes_lengths_and_dtype():
    slopes = alibi_slopes(4)
    first = causal_alibi_bias(slopes, 8, 8, dtype=torch.float32)
    assert causal_alibi_bias(slopes, 8, 8, dtype=torch.float32) is first
    assert causal_alibi_bias(slopes, 8, 8, dtype=torch.bfloat16) is not first
    assert causal_alibi_bias(slopes, 4, 8, dtype=torch.float32) is not first
    assert causal_alibi_bias(alibi_slopes(4), 8, 8, dtype=torch.float32) is not first  # other slopes, own entry


def test_cached_bias_goes_away_with_its_slopes():
    slopes = alibi_slopes(4)
    bias = weakref.ref(causal_alibi_bias(slopes, 8, 8, dtype=torch.float32))
    del slopes
    gc.collect()
    assert bias() is None


def test_one_forward_builds_the_bias_once_for_all_layers(monkeypatch):
    builds = []
    build = alibi.alibi_bias

    def counting(*args, **kwargs):
        builds.append(args[1:3])
        return build(*args, **kwargs)

    monkeypatch.setattr(alibi, "alibi_bias", counting)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=4, max_seq_len=16, vocab_size=64,
                                     attn_impl="sdpa"))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    assert builds == [(16, 16)]
