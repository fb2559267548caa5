import torch
import torch.nn.functional as F

from mptlike.ops.layernorm import LPLayerNorm


def _norm(bias: bool) -> LPLayerNorm:
    torch.manual_seed(0)
    norm = LPLayerNorm(32, eps=1e-5, bias=bias)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        if bias:
            norm.bias.normal_(0.0, 0.2)
    return norm


def test_lp_layernorm_has_weight_and_no_bias_by_default():
    names = [name for name, _ in LPLayerNorm(16).named_parameters()]
    assert names == ["weight"]
    assert [name for name, _ in LPLayerNorm(16, bias=True).named_parameters()] == ["weight", "bias"]


def test_lp_layernorm_equals_f_layer_norm_outside_autocast():
    norm = _norm(bias=True)
    x = torch.randn(2, 5, 32)
    expected = F.layer_norm(x, (32,), norm.weight, norm.bias, 1e-5)
    assert torch.equal(norm(x), expected)


def test_lp_layernorm_returns_bf16_under_cpu_autocast_within_bf16_rounding():
    norm = _norm(bias=True)
    x = torch.randn(2, 5, 32) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = F.layer_norm(x, (32,), norm.weight, norm.bias, 1e-5)
    # Input, weight and bias are each rounded to bf16 (8 significant bits), then the result once more.
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


def test_lp_layernorm_passes_fp32_gradients_to_its_weight_under_autocast():
    norm = _norm(bias=False)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm(x).float().square().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_lp_layernorm_builds_on_meta_device():
    with torch.device("meta"):
        norm = LPLayerNorm(64)
    assert norm.weight.is_meta
    assert norm(torch.empty(2, 64, device="meta")).shape == (2, 64)
