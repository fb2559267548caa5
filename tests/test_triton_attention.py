"""The Triton FlashAttention kernel against a float64 reference written from the definition.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before any kernel is decorated), so shapes stay tiny; blocks of 16 still give several query and key blocks,
partial last blocks, diagonal and fully visible tiles. The GPU test uses real shapes.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from mptlike.errors import MptlikeError
from mptlike.ops.alibi import alibi_slopes
from mptlike.ops.triton_attention import _attention, _LaunchOptions, check_triton_attention, triton_attention

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA and not INTERPRETED else "cpu"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("the triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def reference_attention(q, k, v, scale, slopes, sequence_id):
    """Causal attention in float64 with an explicit bias and mask: the definition, nothing fused."""
    q, k, v = q.double(), k.double(), v.double()
    _, q_len, n_heads, _ = q.shape
    k_len, n_kv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(n_heads // n_kv, dim=2)
    v = v.repeat_interleave(n_heads // n_kv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
    k_pos = torch.arange(k_len, device=q.device)[None, :]
    if slopes is not None:
        scores = scores + slopes.double().to(q.device)[:, None, None] * (k_pos - q_pos)
    allowed = (k_pos <= q_pos)[None, None]
    if sequence_id is not None:
        q_ids = sequence_id[:, k_len - q_len :]
        allowed = allowed & (q_ids[:, :, None] == sequence_id[:, None, :])[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)


def make_inputs(batch, q_len, k_len, n_heads, n_kv, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, q_len, n_heads, head_dim), (batch, k_len, n_kv, head_dim), (batch, k_len, n_kv, head_dim)]
    return [torch.randn(s, generator=gen).to(DEVICE, dtype).requires_grad_() for s in shapes]


def packed_ids(batch, k_len, lengths):
    """Documents of the given lengths packed into each row (the last one runs to the end)."""
    rows = []
    for b in range(batch):
        ids, doc = [], 0
        for n in lengths[b % len(lengths)]:
            ids += [doc] * n
            doc += 1
        ids = (ids + [doc] * k_len)[:k_len]
        rows.append(ids)
    return torch.tensor(rows, device=DEVICE)


def max_rel_err(ours, ref):
    return ((ours.double() - ref).abs().max() / ref.abs().max()).item()


def check_against_reference(q, k, v, slopes, sequence_id, options=_LaunchOptions(), tol=1e-4):
    scale = q.shape[-1] ** -0.5
    out = _attention(q, k, v, scale, slopes, sequence_id, options)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, scale, slopes, sequence_id)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())

    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(ours).all(), name
        assert max_rel_err(ours, theirs) < tol, f"{name}: relative error {max_rel_err(ours, theirs):.2e}"


# (batch, q_len, k_len, n_heads, n_kv, head_dim): lengths that are not multiples of the 16-row blocks.
MHA = (2, 37, 37, 2, 2, 16)
GQA = (1, 45, 45, 4, 2, 32)
MQA = (1, 33, 33, 4, 1, 16)


@pytest.mark.parametrize("shape", [MHA, GQA, MQA], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "no_alibi"])
def test_forward_and_grads_match_reference_in_fp32(shape, alibi):
    batch, q_len, k_len, n_heads, n_kv, head_dim = shape
    q, k, v = make_inputs(*shape)
    check_against_reference(q, k, v, alibi_slopes(n_heads) if alibi else None, None)


@pytest.mark.parametrize("shape", [MHA, GQA, MQA], ids=["mha", "gqa", "mqa"])
def test_packed_documents_match_reference_in_fp32(shape):
    batch, q_len, k_len, n_heads, n_kv, head_dim = shape
    q, k, v = make_inputs(*shape, seed=2)
    # Row 0: documents that start inside blocks; row 1: a block-aligned boundary, then short documents.
    ids = packed_ids(batch, k_len, [[7, 11, 3], [16, 5, 2]])
    check_against_reference(q, k, v, alibi_slopes(n_heads), ids)


def test_packed_documents_without_alibi_match_reference():
    q, k, v = make_inputs(*GQA, seed=3)
    check_against_reference(q, k, v, None, packed_ids(1, 45, [[20, 9]]))


def test_sequence_ids_are_compared_by_value_even_when_a_document_id_repeats():
    # The definition masks by id equality, so key 0..9 and 30..44 (both id 0) see each other.
    q, k, v = make_inputs(*GQA, seed=4)
    ids = torch.tensor([[0] * 10 + [1] * 20 + [0] * 15], device=DEVICE)
    check_against_reference(q, k, v, alibi_slopes(4), ids)


@pytest.mark.parametrize(
    "q_len,k_len,n_heads,n_kv",
    [(1, 29, 4, 2), (7, 40, 4, 1), (20, 41, 2, 2)],
    ids=["decode_one_token", "prefill_chunk_mqa", "second_half_mha"],
)
def test_queries_aligned_to_the_end_of_longer_keys_match_reference(q_len, k_len, n_heads, n_kv):
    q, k, v = make_inputs(2, q_len, k_len, n_heads, n_kv, 16, seed=5)
    ids = packed_ids(2, k_len, [[12, 9], [3]])
    check_against_reference(q, k, v, alibi_slopes(n_heads), ids)


@pytest.mark.parametrize(
    "options",
    [_LaunchOptions(block_m=32, block_n=16, kv_splits=2), _LaunchOptions(block_m=16, block_n=32, kv_splits=1)],
    ids=["tall_query_blocks_split_groups", "wide_key_blocks"],
)
def test_unequal_query_and_key_blocks_and_split_groups_match_reference(options):
    q, k, v = make_inputs(1, 45, 45, 4, 2, 16, seed=6)
    check_against_reference(q, k, v, alibi_slopes(4), packed_ids(1, 45, [[18, 13]]), options)


def test_head_dim_that_is_not_a_power_of_two_matches_reference():
    # mpt-30b has head_dim 112: the kernel pads the head dimension to a power of two and masks it.
    q, k, v = make_inputs(1, 33, 33, 2, 1, 24, seed=7)
    check_against_reference(q, k, v, alibi_slopes(2), None)


def test_strided_views_of_a_fused_qkv_projection_match_reference():
    # The model splits one (B, S, 3 * H * D) projection, so q, k, v are views with a row stride of 3 * H * D.
    batch, seq, n_heads, head_dim = 1, 35, 2, 16
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(batch, seq, 3 * n_heads * head_dim, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = (t.view(batch, seq, n_heads, head_dim) for t in qkv.split(n_heads * head_dim, dim=-1))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, alibi_slopes(n_heads), None)


def test_bf16_forward_is_within_bf16_rounding_of_the_reference():
    q, k, v = make_inputs(1, 40, 40, 4, 2, 32, dtype=torch.bfloat16, seed=9)
    slopes = alibi_slopes(4)
    ids = packed_ids(1, 40, [[25]])
    with torch.no_grad():
        out = triton_attention(q, k, v, softmax_scale=32**-0.5, alibi_slopes=slopes, sequence_id=ids)
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out, reference_attention(q, k, v, 32**-0.5, slopes, ids)) < 2e-2


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_key_blocks_right_of_the_causal_diagonal_are_never_read():
    # NaN keys and values past position 15: if the first query block loaded them at all (even
    # masked), 0 * NaN would poison its rows.
    q, k, v = (t.detach() for t in make_inputs(1, 48, 48, 2, 2, 16, seed=10))
    k[:, 16:], v[:, 16:] = float("nan"), float("nan")
    out = _attention(q, k, v, 0.25, alibi_slopes(2), None, _LaunchOptions(16, 16))
    ref = reference_attention(q[:, :16], k[:, :16], v[:, :16], 0.25, alibi_slopes(2), None)
    assert max_rel_err(out[:, :16], ref) < 1e-4


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_key_blocks_of_earlier_documents_are_skipped_in_forward_and_query_gradient():
    # Document 0 fills the first key block exactly; queries of document 1 must not touch it.
    q, k, v = make_inputs(1, 48, 48, 2, 2, 16, seed=11)
    poisoned_k, poisoned_v = (t.detach().clone() for t in (k, v))
    poisoned_k[:, :16], poisoned_v[:, :16] = float("nan"), float("nan")
    ids = packed_ids(1, 48, [[16]])
    out = _attention(q, poisoned_k, poisoned_v, 0.25, alibi_slopes(2), ids, _LaunchOptions(16, 16))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(13)).to(out)
    (dq,) = torch.autograd.grad(out, (q,), grad_out)

    leaves = [t.detach()[:, 16:].double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, 0.25, alibi_slopes(2), None)
    (ref_dq,) = torch.autograd.grad(ref, leaves[:1], grad_out[:, 16:].double())
    assert max_rel_err(out[:, 16:], ref) < 1e-4
    assert max_rel_err(dq[:, 16:], ref_dq) < 1e-4


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_query_blocks_of_later_documents_are_skipped_in_the_key_gradient():
    # Poisoned queries of document 1 give NaN rows (and NaN lse, delta); dK and dV of document 0's
    # keys stay finite only if the dK/dV kernel skips those query blocks.
    q, k, v = make_inputs(1, 48, 48, 2, 2, 16, seed=12)
    ids = packed_ids(1, 48, [[16]])
    poisoned = q.detach().clone()
    poisoned[:, 16:] = float("nan")
    poisoned.requires_grad_()
    out = _attention(poisoned, k, v, 0.25, alibi_slopes(2), ids, _LaunchOptions(16, 16))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(13)).to(out)
    _, dk, dv = torch.autograd.grad(out, (poisoned, k, v), grad_out)

    leaves = [t.detach()[:, :16].double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, 0.25, alibi_slopes(2), None)
    _, ref_dk, ref_dv = torch.autograd.grad(ref, leaves, grad_out[:, :16].double())
    assert max_rel_err(dk[:, :16], ref_dk) < 1e-4
    assert max_rel_err(dv[:, :16], ref_dv) < 1e-4


def test_compiles_into_one_graph_as_an_opaque_custom_op():
    q, k, v = make_inputs(1, 20, 20, 4, 2, 16, seed=14)
    slopes = alibi_slopes(4)

    def loss(q, k, v):
        return triton_attention(q, k, v, softmax_scale=0.25, alibi_slopes=slopes).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    ours = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b)


def test_cpu_tensors_without_the_interpreter_raise_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MptlikeError, match="TRITON_INTERPRET=1"):
        check_triton_attention("cpu")


def test_import_works_without_triton_and_calling_names_the_install_command():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from mptlike.errors import MptlikeError\n"
        "from mptlike.ops.triton_attention import triton_attention\n"
        "x = torch.zeros(1, 4, 2, 16)\n"
        "try:\n"
        "    triton_attention(x, x, x, softmax_scale=0.25, alibi_slopes=None)\n"
        "except MptlikeError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'mptlike[triton]'" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA device")
@pytest.mark.parametrize("n_kv", [16, 4], ids=["mha", "gqa"])
def test_real_shapes_in_bf16_match_reference_on_gpu(n_kv):
    batch, seq, n_heads, head_dim = 1, 2048, 16, 128
    q, k, v = make_inputs(batch, seq, seq, n_heads, n_kv, head_dim, dtype=torch.bfloat16, seed=15)
    slopes = alibi_slopes(n_heads)
    ids = packed_ids(batch, seq, [[700, 900]])
    out = triton_attention(q, k, v, softmax_scale=head_dim**-0.5, alibi_slopes=slopes, sequence_id=ids)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, head_dim**-0.5, slopes, ids)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert max_rel_err(ours, theirs) < 2e-2, name
