"""The Triton kernels' autotune candidates: pruned by the shared memory their tiles need (pure Python)."""

import pytest
import torch

pytest.importorskip("triton")

from mptlike.ops import triton_attention as ta  # noqa: E402

H100_SHARED_MEMORY = 228 * 1024  # per thread block


def _kept(candidates, outer_tiles, dtype, head_dim=128):
    configs = ta._configs(candidates, "BLOCK_M", "BLOCK_N")
    prune = ta._prune("BLOCK_M", "BLOCK_N", outer_tiles, 2)
    named_args = {"Q": torch.empty(1, dtype=dtype), "BLOCK_D": head_dim}
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in prune(configs, named_args)]


def _shared_bytes(outer, inner, stages, outer_tiles, element_size, head_dim=128):
    return element_size * head_dim * (outer_tiles * outer + 2 * inner * stages)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_configs_kept_fit_in_an_h100s_shared_memory_for_the_input_dtype(dtype):
    size = torch.empty(0, dtype=dtype).element_size()
    kept = _kept(ta._FWD_CONFIGS, 1, dtype)
    assert kept
    for outer, inner, stages in kept:
        assert _shared_bytes(outer, inner, stages, 1, size) <= H100_SHARED_MEMORY, (outer, inner, stages, dtype)


def test_fp32_inputs_prune_the_forward_configs_that_only_fit_in_16_bits():
    bf16 = _kept(ta._FWD_CONFIGS, 1, torch.bfloat16)
    fp32 = _kept(ta._FWD_CONFIGS, 1, torch.float32)
    assert (128, 64, 3) in bf16 and (128, 64, 3) not in fp32  # 256 KiB of fp32 tiles
    assert fp32 and all(_shared_bytes(o, i, s, 1, 4) <= H100_SHARED_MEMORY for o, i, s in fp32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_kernel_keeps_a_tiling_that_fits_for_every_dtype_and_head_dim(dtype, head_dim):
    # dK/dV holds four resident tiles (k, v, dk, dv), dQ three, the forward one; fp32 at head dim 256
    # fits none of the tuned candidates and must fall back to smaller tiles, not to the first candidate.
    size = torch.empty(0, dtype=dtype).element_size()
    for candidates, outer_tiles in ((ta._FWD_CONFIGS, 1), (ta._DKDV_CONFIGS, 4), (ta._DQ_CONFIGS, 3)):
        configs = ta._configs(candidates, "BLOCK_M", "BLOCK_N")
        prune = ta._prune("BLOCK_M", "BLOCK_N", outer_tiles, 2)
        kept = prune(configs, {"Q": torch.empty(1, dtype=dtype), "BLOCK_D": head_dim})
        assert kept
        for c in kept:
            used = _shared_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, outer_tiles, size, head_dim)
            assert used <= H100_SHARED_MEMORY, (candidates, c, dtype, head_dim)


def test_the_autotune_key_tells_a_small_batch_of_few_heads_from_a_large_one():
    """The benchmark's small correctness check must not pick the tiles its timed large run reuses."""
    small = ta._common_args(torch.empty(1, 256, 4, 64), torch.empty(1, 256, 4, 64), None, None)
    large = ta._common_args(torch.empty(8, 256, 32, 64), torch.empty(8, 256, 32, 64), None, None)
    key = ta._TUNE_KEY
    assert [small[k] for k in key] != [large[k] for k in key]
    assert (small["BH_BUCKET"], large["BH_BUCKET"]) == (4, 256)
