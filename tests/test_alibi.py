import pytest
import torch
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from mptlike.ops.alibi import alibi_bias, alibi_slopes


def test_alibi_slopes_match_reference_for_8_heads():
    # Power of two: the geometric sequence 2^(-8 i / 8) for i = 1..8.
    expected = torch.tensor([2.0 ** -i for i in range(1, 9)])
    torch.testing.assert_close(alibi_slopes(8), expected, rtol=0, atol=0)


def test_alibi_slopes_match_reference_for_12_heads():
    # 12 heads borrow the 16-head sequence 2^(-i/2), i = 1..16: first its odd positions (exponents 1..8),
    # then its even positions (exponents 0.5, 1.5, 2.5, 3.5) until 12 heads are filled.
    exponents = [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]
    expected = torch.tensor([2.0 ** -e for e in exponents])
    torch.testing.assert_close(alibi_slopes(12), expected, rtol=1e-7, atol=0)


def test_alibi_slopes_scale_with_alibi_bias_max():
    expected = torch.tensor([2.0 ** -(16 * i / 4) for i in range(1, 5)])
    torch.testing.assert_close(alibi_slopes(4, alibi_bias_max=16.0), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("n_heads", [8, 12, 16, 24])
def test_alibi_slopes_match_transformers_mpt(n_heads):
    # build_mpt_alibi_tensor returns (H, 1, S) = slope * (position - (S - 1)); at S = 2, column 0 is -slope.
    hf = build_mpt_alibi_tensor(n_heads, 2, alibi_bias_max=8)
    torch.testing.assert_close(alibi_slopes(n_heads), -hf[:, 0, 0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("q_len,k_len", [(5, 5), (1, 7), (3, 7)])
def test_alibi_bias_is_slope_times_key_minus_query_position(q_len, k_len):
    slopes = torch.tensor([0.5, 0.25, 0.125])
    bias = alibi_bias(slopes, q_len, k_len)
    assert bias.shape == (1, 3, q_len, k_len) and bias.dtype == torch.float32
    for h in range(3):
        for i in range(q_len):
            for j in range(k_len):
                assert bias[0, h, i, j].item() == slopes[h].item() * (j - (k_len - q_len + i))


def test_alibi_bias_matches_transformers_mpt_on_last_row():
    # transformers' tensor is the last query's row (keys 0..S-1 seen from position S-1).
    hf = build_mpt_alibi_tensor(12, 9, alibi_bias_max=8)  # (H, 1, S)
    ours = alibi_bias(alibi_slopes(12), 1, 9)  # (1, H, 1, S)
    torch.testing.assert_close(ours[0], hf, rtol=1e-6, atol=0)


def test_alibi_bias_in_bf16_is_the_fp32_bias_rounded_once():
    # Distances past 256 are not representable in bf16, so the product must be formed before the cast.
    slopes = alibi_slopes(6)
    low = alibi_bias(slopes, 40, 600, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, alibi_bias(slopes, 40, 600).to(torch.bfloat16))
