import importlib
import importlib.util
import itertools
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mptlike.errors import MptlikeError
from mptlike.ops.alibi import alibi_slopes
from mptlike.ops.attention import ATTN_IMPLS, attention, check_attn_impl

attention_module = importlib.import_module("mptlike.ops.attention")

HAS_CUDA = torch.cuda.is_available()
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

B, D = 2, 16
# (n_heads, n_kv_heads): MHA, GQA, MQA, and head counts that are and are not powers of two.
HEADS = [(8, 8), (8, 2), (8, 1), (6, 6), (6, 2), (6, 1)]
# (q_len, k_len): training, KV-cache decoding of one token, a prefill chunk after a cache.
LENGTHS = [(32, 32), (1, 24), (5, 24)]


def _inputs(n_heads, n_kv, q_len, k_len, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, q_len, n_heads, D, generator=gen)
    k = torch.randn(B, k_len, n_kv, D, generator=gen)
    v = torch.randn(B, k_len, n_kv, D, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _sequence_id(k_len, device="cpu"):
    # Row 0: three packed documents; row 1: one document that ends early, then another.
    row0 = torch.tensor([0] * (k_len // 3) + [1] * (k_len // 3) + [2] * (k_len - 2 * (k_len // 3)))
    row1 = torch.tensor([0] * (k_len - 4) + [1] * 4)
    return torch.stack([row0, row1]).to(device)


def _naive_attention(q, k, v, scale, slopes, sequence_id):
    """One query at a time in float64, straight from the definition."""
    batch, q_len, n_heads, _ = q.shape
    k_len, n_kv = k.shape[1], k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(n_heads):
            g = h // (n_heads // n_kv)
            for i in range(q_len):
                pos = k_len - q_len + i
                keys = [
                    j
                    for j in range(pos + 1)
                    if sequence_id is None or sequence_id[b, j] == sequence_id[b, pos]
                ]
                logits = []
                for j in keys:
                    s = scale * float(q[b, i, h].double() @ k[b, j, g].double())
                    if slopes is not None:
                        s += float(slopes[h]) * (j - pos)
                    logits.append(s)
                m = max(logits)
                weights = [math.exp(s - m) for s in logits]
                total = sum(weights)
                for w, j in zip(weights, keys):
                    out[b, i, h] += (w / total) * v[b, j, g].double()
    return out


@pytest.mark.parametrize("n_heads,n_kv", [(6, 2), (4, 4)])
@pytest.mark.parametrize("q_len,k_len", [(12, 12), (3, 12)])
def test_torch_reference_matches_naive_per_query_loop(n_heads, n_kv, q_len, k_len):
    q, k, v = _inputs(n_heads, n_kv, q_len, k_len)
    slopes = torch.rand(n_heads)  # any slopes will do: the reference must follow the formula, not MPT's table
    seq = _sequence_id(k_len)
    out = attention(q, k, v, impl="torch", softmax_scale=0.3, alibi_slopes=slopes, sequence_id=seq)
    expected = _naive_attention(q, k, v, 0.3, slopes, seq)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def _compare(impl, n_heads, n_kv, q_len, k_len, use_alibi, use_seq, backward, dtype=torch.float32, device="cpu",
             fwd_atol=1e-5, grad_rtol=1e-4):
    q, k, v = _inputs(n_heads, n_kv, q_len, k_len, dtype=dtype, device=device)
    slopes = alibi_slopes(n_heads, device=device) if use_alibi else None
    seq = _sequence_id(k_len, device) if use_seq else None
    kwargs = dict(softmax_scale=1 / math.sqrt(D), alibi_slopes=slopes, sequence_id=seq)

    def run(name):
        leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]
        out = attention(*leaves, impl=name, **kwargs)
        grads = None
        if backward:
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
            grads = torch.autograd.grad((out.float() * weight.float()).sum(), leaves)
        return out.detach(), grads

    out, grads = run(impl)
    ref_out, ref_grads = run("torch")
    assert out.shape == (B, q_len, n_heads, D) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=fwd_atol)
    if backward:
        for name, g, g_ref in zip("qkv", grads, ref_grads):
            err = (g.float() - g_ref.float()).norm() / g_ref.float().norm()
            assert err < grad_rtol, f"d{name} relative error {err:.2e}"


CASES = list(itertools.product(HEADS, LENGTHS, [False, True], [False, True]))


def _case_id(case):
    (h, hkv), (sq, sk), use_alibi, use_seq = case
    return f"h{h}kv{hkv}-q{sq}k{sk}-{'alibi' if use_alibi else 'noalibi'}-{'seq' if use_seq else 'noseq'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sdpa_matches_torch_reference_forward_and_gradients(case):
    (n_heads, n_kv), (q_len, k_len), use_alibi, use_seq = case
    _compare("sdpa", n_heads, n_kv, q_len, k_len, use_alibi, use_seq, backward=True)


# Eager flex on CPU traces every new shape (about a second each), so it gets a covering subset.
FLEX_CPU_CASES = (
    [(heads, (32, 32), True, True) for heads in HEADS]
    + [((8, 2), (32, 32), use_alibi, use_seq) for use_alibi, use_seq in [(False, False), (True, False), (False, True)]]
    + [((8, 2), (1, 24), True, True), ((6, 1), (1, 24), True, False)]
    + [((8, 1), (5, 24), True, True), ((6, 6), (5, 24), False, False)]
)


@pytest.mark.parametrize("case", FLEX_CPU_CASES, ids=_case_id)
def test_flex_matches_torch_reference_forward_on_cpu(case):
    (n_heads, n_kv), (q_len, k_len), use_alibi, use_seq = case
    _compare("flex", n_heads, n_kv, q_len, k_len, use_alibi, use_seq, backward=False)


def test_sdpa_mask_free_causal_case_passes_no_mask(monkeypatch):
    seen = {}
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    q, k, v = _inputs(8, 2, 16, 16)
    attention(q, k, v, impl="sdpa", softmax_scale=0.25, alibi_slopes=None)
    assert seen["attn_mask"] is None and seen["is_causal"] is True and seen["enable_gqa"] is True


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_dropout_keeps_the_expected_output(impl):
    # Inverted dropout: each draw differs, the average over draws is the dropout-free output.
    n_draws = 4000
    q, k, v = (t[:1].expand(n_draws, *t.shape[1:]) for t in _inputs(2, 2, 6, 6))
    kwargs = dict(impl=impl, softmax_scale=0.25, alibi_slopes=alibi_slopes(2))
    clean = attention(q[:1], k[:1], v[:1], **kwargs)[0]
    torch.manual_seed(0)
    draws = attention(q, k, v, dropout_p=0.3, **kwargs)  # every batch row draws its own mask
    assert not torch.allclose(draws[0], clean)
    torch.testing.assert_close(draws.mean(0), clean, rtol=0, atol=0.06)


def test_flex_rejects_dropout():
    q, k, v = _inputs(2, 2, 4, 4)
    with pytest.raises(MptlikeError, match="attn_pdrop"):
        attention(q, k, v, impl="flex", softmax_scale=0.25, alibi_slopes=None, dropout_p=0.1)


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_low_precision_inputs_give_outputs_in_their_dtype(impl):
    q, k, v = _inputs(4, 2, 8, 8, dtype=torch.bfloat16)
    out = attention(q, k, v, impl=impl, softmax_scale=0.25, alibi_slopes=alibi_slopes(4))
    assert out.dtype == torch.bfloat16
    ref = attention(q.float(), k.float(), v.float(), impl="torch", softmax_scale=0.25, alibi_slopes=alibi_slopes(4))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_torch_reference_keeps_fp32_scores_under_autocast():
    q, k, v = _inputs(4, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, impl="torch", softmax_scale=0.25, alibi_slopes=None)
    ref = attention(q, k, v, impl="torch", softmax_scale=0.25, alibi_slopes=None)
    assert torch.equal(out, ref)


# --- check_attn_impl -----------------------------------------------------------------------------


def test_check_attn_impl_accepts_torch_sdpa_and_flex():
    for impl in ("torch", "sdpa", "flex"):
        check_attn_impl(impl)
    assert set(ATTN_IMPLS) >= {"torch", "sdpa", "flex", "flash"}


def test_check_attn_impl_rejects_unknown_names():
    with pytest.raises(MptlikeError, match="'xformers'"):
        check_attn_impl("xformers")
    q, k, v = _inputs(2, 2, 4, 4)
    with pytest.raises(MptlikeError):
        attention(q, k, v, impl="xformers", softmax_scale=0.25, alibi_slopes=None)


def test_check_attn_impl_names_the_flash_extra_when_flash_attn_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` raise ImportError
    with pytest.raises(MptlikeError, match=r"pip install 'mptlike\[flash\]'"):
        check_attn_impl("flash")


# --- flash: glue code against a stand-in that follows flash-attn's documented semantics ---------


def _flash_semantics(q, k, v, scale, slopes):
    """One sequence, flash-attn style: (S, H, D) inputs, causal aligned bottom-right, bias -slope*|i-j|."""
    q_len, n_heads, _ = q.shape
    k_len, n_kv, _ = k.shape
    k = k.double().repeat_interleave(n_heads // n_kv, dim=1)
    v = v.double().repeat_interleave(n_heads // n_kv, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q.double(), k) * scale
    i = torch.arange(q_len)[:, None] + (k_len - q_len)
    j = torch.arange(k_len)[None, :]
    if slopes is not None:
        scores = scores - slopes.double()[:, None, None] * (i - j).abs()
    scores = scores.masked_fill(j > i, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).to(q.dtype)


def _fake_flash_module():
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None):
        assert causal and dropout_p == 0.0 and q.dtype in (torch.float16, torch.bfloat16)
        return torch.stack([_flash_semantics(q[b], k[b], v[b], softmax_scale, alibi_slopes) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, alibi_slopes=None):
        assert causal and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert max_seqlen_q == max(b - a for a, b in zip(cq, cq[1:]))
        assert max_seqlen_k == max(b - a for a, b in zip(ck, ck[1:]))
        pieces = []
        for n in range(len(cq) - 1):
            qs, ks = slice(cq[n], cq[n + 1]), slice(ck[n], ck[n + 1])
            pieces.append(_flash_semantics(q[qs], k[ks], v[ks], softmax_scale, alibi_slopes))
        return torch.cat(pieces)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


FLASH_CASES = list(itertools.product([(8, 8), (8, 2), (6, 1)], LENGTHS, [False, True], [False, True]))


@pytest.mark.parametrize("case", FLASH_CASES, ids=_case_id)
def test_flash_glue_matches_torch_reference_with_stand_in_kernel(case, monkeypatch):
    # Checks our side of the flash backend (layouts, ALiBi sign, varlen documents) on CPU, where
    # flash-attn cannot run; inputs are bf16 because that is all flash-attn accepts.
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_module())
    (n_heads, n_kv), (q_len, k_len), use_alibi, use_seq = case
    _compare("flash", n_heads, n_kv, q_len, k_len, use_alibi, use_seq, backward=True, dtype=torch.bfloat16,
             fwd_atol=2e-2, grad_rtol=2e-2)


# --- GPU ----------------------------------------------------------------------------------------

GPU_LENGTHS = [(128, 128), (1, 96), (16, 96)]
GPU_CASES = list(itertools.product([(8, 8), (8, 2), (6, 1)], GPU_LENGTHS, [False, True], [False, True]))


@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_backend_matches_torch_reference_forward_and_gradients_on_gpu(impl, case):
    (n_heads, n_kv), (q_len, k_len), use_alibi, use_seq = case
    torch.backends.cuda.matmul.allow_tf32 = False
    _compare(impl, n_heads, n_kv, q_len, k_len, use_alibi, use_seq, backward=True, device="cuda",
             fwd_atol=1e-4, grad_rtol=1e-3)


@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_FLASH), reason="needs a CUDA device and flash-attn")
def test_flash_matches_torch_reference_forward_and_gradients_on_gpu(case):
    (n_heads, n_kv), (q_len, k_len), use_alibi, use_seq = case
    _compare("flash", n_heads, n_kv, q_len, k_len, use_alibi, use_seq, backward=True, dtype=torch.bfloat16,
             device="cuda", fwd_atol=2e-2, grad_rtol=2e-2)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only refusal")
def test_flex_backward_on_cpu_raises_mptlike_error_naming_sdpa_or_matches_the_reference():
    # Eager flex on CPU is forward-only in recent torch; torch 2.6/2.7 also run its backward.
    q, k, v = (t.requires_grad_(True) for t in _inputs(2, 2, 4, 4))
    try:
        out = attention(q, k, v, impl="flex", softmax_scale=0.25, alibi_slopes=None)
    except MptlikeError as exc:
        assert "attn_impl=sdpa" in str(exc)
        return
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference = attention(q, k, v, impl="torch", softmax_scale=0.25, alibi_slopes=None)
    reference.sum().backward()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
