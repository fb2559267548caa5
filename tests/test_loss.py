import pytest
import torch
import torch.nn.functional as F

from mptlike.ops import loss as loss_module
from mptlike.ops.loss import cross_entropy

V = 97


def _data(shape=(3, 11), dtype=torch.float32, n_ignored=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, V, shape, generator=gen)
    flat = targets.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = -100
    return logits, targets


def _reference(logits, targets):
    x = logits.detach().double().requires_grad_(True)
    value = F.cross_entropy(x.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    value.backward()
    return value.detach(), x.grad


def test_cross_entropy_value_and_gradient_match_float64_reference_with_ignored_rows():
    logits, targets = _data()
    ref_value, ref_grad = _reference(logits, targets)
    x = logits.clone().requires_grad_(True)
    value = cross_entropy(x, targets)
    value.backward()
    assert value.dtype == torch.float32 and value.shape == ()
    assert abs(value.item() - ref_value.item()) < 1e-6
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=0, atol=1e-6)


def test_cross_entropy_is_exact_across_chunk_boundaries(monkeypatch):
    # Force several rows per chunk with a ragged last chunk, as large vocabularies do.
    monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", 4 * V)
    logits, targets = _data(shape=(2, 9))
    ref_value, ref_grad = _reference(logits, targets)
    x = logits.clone().requires_grad_(True)
    value = cross_entropy(x, targets)
    value.backward()
    assert abs(value.item() - ref_value.item()) < 1e-6
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=0, atol=1e-6)


def test_cross_entropy_scales_gradient_by_upstream_gradient():
    logits, targets = _data()
    _, ref_grad = _reference(logits, targets)
    x = logits.clone().requires_grad_(True)
    (2.5 * cross_entropy(x, targets)).backward()
    torch.testing.assert_close(x.grad.double(), 2.5 * ref_grad, rtol=0, atol=3e-6)


def test_cross_entropy_bf16_logits_get_bf16_gradient_close_to_reference():
    logits, targets = _data(dtype=torch.bfloat16)
    ref_value, ref_grad = _reference(logits, targets)
    x = logits.clone().requires_grad_(True)
    value = cross_entropy(x, targets)
    value.backward()
    assert value.dtype == torch.float32
    # Forward reads the bf16 values exactly and works in fp32, so only fp32 rounding remains.
    assert abs(value.item() - ref_value.item()) < 1e-5
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-2, atol=1e-5)


def test_cross_entropy_with_every_target_ignored_is_zero_with_zero_gradient():
    logits, targets = _data()
    targets.fill_(-100)
    x = logits.clone().requires_grad_(True)
    value = cross_entropy(x, targets)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_cross_entropy_honours_a_custom_ignore_index():
    logits, targets = _data(n_ignored=0)
    targets[0, :4] = 5
    x = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(logits.double().view(-1, V), targets.view(-1), ignore_index=5)
    assert abs(cross_entropy(x, targets, ignore_index=5).item() - expected.item()) < 1e-6


def test_cross_entropy_backward_keeps_no_fp32_copy_of_bf16_logits():
    logits, targets = _data(shape=(4, 16), dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = cross_entropy(x, targets)
    assert (torch.bfloat16, x.numel()) in saved  # the hook did see the logits themselves
    big_fp32 = [s for s in saved if s[0] == torch.float32 and s[1] >= x.numel()]
    assert big_fp32 == []
    value.backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cross_entropy_matches_reference_on_gpu():
    logits, targets = _data(shape=(8, 64))
    ref_value, ref_grad = _reference(logits, targets)
    x = logits.cuda().requires_grad_(True)
    value = cross_entropy(x, targets.cuda())
    value.backward()
    assert abs(value.item() - ref_value.item()) < 1e-5
    torch.testing.assert_close(x.grad.double().cpu(), ref_grad, rtol=0, atol=1e-6)
