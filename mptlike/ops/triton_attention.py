"""FlashAttention-2 in Triton with ALiBi from the slopes, GQA and packed-document masks.

Computes the same function as every backend of ``mptlike.ops.attention`` (queries aligned to the end
of the keys, ``slope[h] * (key_pos - query_pos)`` bias, kv head ``h // (H // Hkv)``, keys of other
documents masked) without ever materializing a score, bias or mask tensor:

- forward: one program per (query block, batch * head) streams the key blocks it can see with an
  online softmax in fp32. Scores live in base 2 (``log2(e)`` is folded into the softmax scale and
  the slopes), so each exponential is one ``exp2``. Key blocks right of the causal diagonal are never
  visited, blocks left of it skip the mask arithmetic, and with sequence ids a cheap scan of the id
  ranges skips the blocks before the first document a query block can see.
- backward: ``delta = rowsum(dO * O)``, then one kernel over key blocks accumulating dK and dV in
  registers (each program walks the query heads of its kv group, so GQA needs no atomics) and one
  kernel over query blocks for dQ. Probabilities are recomputed from the saved base-2 log-sum-exp.

The kernels are compiled on first use, so ``TRITON_INTERPRET=1`` (which runs them on CPU tensors,
slowly, for tests) only has to be set before the first call. The two launches are registered as
torch custom ops, so ``torch.compile`` treats attention as one opaque node instead of breaking the graph.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from mptlike.errors import MptlikeError

try:  # the kernels below name `tl` in their bodies; they are only compiled when triton imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

TRITON_INSTALL_HINT = "pip install 'mptlike[triton]'"
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_attention(device_type: str | None = None) -> None:
    """Raise MptlikeError unless the triton kernels can run on ``device_type`` (default: cuda if present)."""
    if triton is None:
        raise MptlikeError(
            f"model.attn_impl=triton needs the triton package, which is not installed; install it with "
            f"{TRITON_INSTALL_HINT} or use model.attn_impl=sdpa."
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type != "cuda" and not _interpreting():
        raise MptlikeError(
            f"model.attn_impl=triton runs on CUDA tensors, not {device_type}; use a GPU, model.attn_impl=sdpa, "
            "or set TRITON_INTERPRET=1 before the first call to run the kernels (slowly) on CPU."
        )


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    softmax_scale: float,
    alibi_slopes: Tensor | None,
    sequence_id: Tensor | None = None,
) -> Tensor:
    """Causal attention; q ``(B, Sq, H, D)``, k and v ``(B, Sk, Hkv, D)``; returns ``(B, Sq, H, D)`` in q's dtype.

    Same semantics as ``mptlike.ops.attention.attention``: query i sits at position ``Sk - Sq + i``,
    ``alibi_slopes`` is ``(H,)`` (or None), ``sequence_id`` is ``(B, Sk)`` integer (or None).
    Differentiable in q, k and v. Inputs may be fp16, bf16 or fp32; accumulation is fp32.
    """
    return _attention(q, k, v, softmax_scale, alibi_slopes, sequence_id, _LaunchOptions())


# ---------------------------------------------------------------------------------------------
# argument checks and the autograd wrapper


@dataclass(frozen=True)
class _LaunchOptions:
    """Block sizes and the GQA split; 0 picks automatically (autotuned on GPU). Tests pin them."""

    block_m: int = 0
    block_n: int = 0
    kv_splits: int = 0


def _attention(q, k, v, softmax_scale, alibi_slopes, sequence_id, options: _LaunchOptions) -> Tensor:
    check_triton_attention(q.device.type)
    _check_inputs(q, k, v, alibi_slopes, sequence_id)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
    if sequence_id is not None:
        sequence_id = sequence_id.to(q.device)
    return _TritonAttention.apply(
        _last_dim_contiguous(q),
        _last_dim_contiguous(k),
        _last_dim_contiguous(v),
        float(softmax_scale),
        alibi_slopes,
        sequence_id,
        options.block_m,
        options.block_n,
        options.kv_splits,
    )


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, sequence_id: Tensor | None) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise MptlikeError(
            f"triton attention takes q (B, Sq, H, D) and k, v (B, Sk, Hkv, D), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}: reshape the projections to that layout."
        )
    batch, q_len, n_heads, head_dim = q.shape
    k_batch, k_len, n_kv, k_dim = k.shape
    if k_batch != batch or k_dim != head_dim or n_heads % n_kv or q_len > k_len:
        raise MptlikeError(
            f"triton attention needs matching batch and head_dim, H % Hkv == 0 and Sq <= Sk, got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}: pass keys that include the queries' own positions."
        )
    if q.dtype not in _DTYPES:
        raise MptlikeError(f"triton attention supports fp16, bf16 and fp32 inputs, got {q.dtype}: cast q, k, v.")
    if head_dim > _MAX_HEAD_DIM:
        raise MptlikeError(
            f"triton attention supports head_dim <= {_MAX_HEAD_DIM}, got {head_dim}: use more heads or "
            "model.attn_impl=sdpa."
        )
    if slopes is not None and slopes.numel() != n_heads:
        raise MptlikeError(f"alibi_slopes has {slopes.numel()} values for {n_heads} heads: pass one slope per head.")
    if sequence_id is not None and tuple(sequence_id.shape) != (batch, k_len):
        raise MptlikeError(
            f"sequence_id has shape {tuple(sequence_id.shape)}, expected (B, Sk) = ({batch}, {k_len}): "
            "pass one id per key position."
        )


def _last_dim_contiguous(x: Tensor) -> Tensor:
    # The kernels take any batch/sequence/head strides (e.g. views into a fused qkv projection)
    # but read head_dim as one contiguous run.
    return x if x.stride(-1) == 1 else x.contiguous()


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, slopes, sequence_id, block_m, block_n, kv_splits):
        out, lse = torch.ops.mptlike.triton_attention_fwd(q, k, v, softmax_scale, slopes, sequence_id, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse, slopes, sequence_id)
        ctx.softmax_scale = softmax_scale
        ctx.launch = (block_m, block_n, kv_splits)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, slopes, sequence_id = ctx.saved_tensors
        dq, dk, dv = torch.ops.mptlike.triton_attention_bwd(
            _last_dim_contiguous(grad_out), q, k, v, out, lse, ctx.softmax_scale, slopes, sequence_id, *ctx.launch
        )
        return dq, dk, dv, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile, shapes known without running a kernel


@torch.library.custom_op("mptlike::triton_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    alibi_slopes: Optional[Tensor],
    sequence_id: Optional[Tensor],
    block_m: int,
    block_n: int,
) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, softmax_scale, alibi_slopes, sequence_id, block_m, block_n)


@_fwd_op.register_fake
def _(q, k, v, softmax_scale, alibi_slopes, sequence_id, block_m, block_n):
    batch, q_len, n_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, n_heads, q_len), dtype=torch.float32)


@torch.library.custom_op("mptlike::triton_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    softmax_scale: float,
    alibi_slopes: Optional[Tensor],
    sequence_id: Optional[Tensor],
    block_m: int,
    block_n: int,
    kv_splits: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse, softmax_scale, alibi_slopes, sequence_id, block_m, block_n, kv_splits)


@_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, softmax_scale, alibi_slopes, sequence_id, block_m, block_n, kv_splits):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---------------------------------------------------------------------------------------------
# launches


def _common_args(q: Tensor, k: Tensor, slopes: Tensor | None, sequence_id: Tensor | None) -> dict[str, Any]:
    head_dim = q.shape[3]
    seq_strides = (sequence_id.stride(0), sequence_id.stride(1)) if sequence_id is not None else (0, 0)
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_ALIBI=slopes is not None,
        HAS_SEQ=sequence_id is not None,
        # fp32 inputs keep fp32 products (tf32 would cost ~1e-3 relative error); 16-bit use the default.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        stride_seq_b=seq_strides[0],
        stride_seq_s=seq_strides[1],
        SQ_BUCKET=triton.next_power_of_2(q.shape[1]),
        SK_BUCKET=triton.next_power_of_2(k.shape[1]),
        # Batch x heads sets how many programs share the GPU: the best tiles for 8 x 32 are not those
        # for 1 x 4. Part of the autotune key only (never read by the kernels).
        BH_BUCKET=triton.next_power_of_2(q.shape[0] * q.shape[2]),
    )


def _blocks(kernels: _Kernels, block_m: int, block_n: int) -> tuple[dict[str, int], bool]:
    """Launch-time block sizes; (``{}``, True) means the autotuner picks them."""
    if block_m or block_n:
        return dict(BLOCK_M=block_m or 16, BLOCK_N=block_n or 16), False
    if kernels.interpret:
        return dict(BLOCK_M=16, BLOCK_N=16), False
    return {}, True


def _interpreter_safe(kernels: _Kernels, *tensors: Tensor) -> tuple[Tensor, ...]:
    # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits; on CPU run them in fp32
    # (products of bf16 values are exact in fp32, so only the rounding of P before P @ V differs).
    if kernels.interpret and tensors[0].dtype == torch.bfloat16:
        return tuple(t.float() for t in tensors)
    return tensors


def _forward(q, k, v, softmax_scale, slopes, sequence_id, block_m, block_n):
    kernels = _kernels(_interpreting())
    dtype = q.dtype
    q, k, v = _interpreter_safe(kernels, q, k, v)
    batch, q_len, n_heads, head_dim = q.shape
    k_len, n_kv = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out.to(dtype), lse
    blocks, tuned = _blocks(kernels, block_m, block_n)
    kernel = kernels.fwd_tuned if tuned else kernels.fwd

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * n_heads)

    kernel[grid](
        q, k, v, out, lse,
        q if slopes is None else slopes,
        q if sequence_id is None else sequence_id,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        q_len, k_len, n_heads, n_heads // n_kv, softmax_scale * _LOG2E,
        **_common_args(q, k, slopes, sequence_id),
        **blocks,
    )
    return out.to(dtype), lse


def _kv_splits(group: int, k_len: int, batch: int, n_kv: int, device: torch.device, requested: int) -> int:
    """How many programs share one kv head's query heads in the dK/dV kernel.

    1 keeps the whole group in one program (no extra memory, fewest programs); more splits trade an
    fp32 ``(B, Sk, Hkv * splits, D)`` buffer and a sum for parallelism when there are few kv heads.
    """
    if requested:
        if group % requested:
            raise MptlikeError(f"kv_splits={requested} must divide the group size {group}.")
        return requested
    if group == 1 or device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    programs = triton.cdiv(k_len, 128) * batch * n_kv
    for splits in range(1, group + 1):
        if group % splits == 0 and programs * splits >= target:
            return splits
    return group


def _backward(grad_out, q, k, v, out, lse, softmax_scale, slopes, sequence_id, block_m, block_n, kv_splits):
    kernels = _kernels(_interpreting())
    dtype = q.dtype
    grad_out, q, k, v, out = _interpreter_safe(kernels, grad_out, q, k, v, out)
    batch, q_len, n_heads, head_dim = q.shape
    k_len, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    if q.numel() == 0:
        return torch.zeros_like(q, dtype=dtype), torch.zeros_like(k, dtype=dtype), torch.zeros_like(v, dtype=dtype)
    common = _common_args(q, k, slopes, sequence_id)
    blocks, tuned = _blocks(kernels, block_m, block_n)
    slopes_arg = q if slopes is None else slopes
    seq_arg = q if sequence_id is None else sequence_id

    delta = torch.empty_like(lse)
    pre_block = 16 if kernels.interpret else 64
    kernels.delta[(triton.cdiv(q_len, pre_block), batch * n_heads)](
        out, grad_out, delta,
        *out.stride()[:3], *grad_out.stride()[:3],
        q_len, n_heads,
        HEAD_DIM=head_dim, BLOCK_D=common["BLOCK_D"], BLOCK_M=pre_block,
    )

    splits = _kv_splits(group, k_len, batch, n_kv, q.device, kv_splits)
    if splits == 1:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    else:
        # One fp32 slot per split, summed below; fp32 so the sum rounds once.
        shape = (batch, k_len, n_kv * splits, head_dim)
        dk = torch.empty(shape, dtype=torch.float32, device=k.device)
        dv = torch.empty(shape, dtype=torch.float32, device=k.device)

    def dkdv_grid(meta):
        return (triton.cdiv(k_len, meta["BLOCK_N"]), batch * n_kv * splits)

    (kernels.dkdv_tuned if tuned else kernels.dkdv)[dkdv_grid](
        q, k, v, grad_out, lse, delta, dk, dv, slopes_arg, seq_arg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3],
        q_len, k_len, n_heads, n_kv, group, splits, softmax_scale, softmax_scale * _LOG2E,
        **common,
        **blocks,
    )
    if splits > 1:
        dk = dk.view(batch, k_len, n_kv, splits, head_dim).sum(3).to(k.dtype)
        dv = dv.view(batch, k_len, n_kv, splits, head_dim).sum(3).to(v.dtype)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)

    def dq_grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * n_heads)

    (kernels.dq_tuned if tuned else kernels.dq)[dq_grid](
        q, k, v, grad_out, lse, delta, dq, slopes_arg, seq_arg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3],
        q_len, k_len, n_heads, group, softmax_scale, softmax_scale * _LOG2E,
        **common,
        **blocks,
    )
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


# ---------------------------------------------------------------------------------------------
# kernel objects, built on first use (decorating decides between compiled and interpreted)


@dataclass(frozen=True)
class _Kernels:
    interpret: bool
    fwd: Any
    fwd_tuned: Any
    delta: Any
    dkdv: Any
    dkdv_tuned: Any
    dq: Any
    dq_tuned: Any


_TUNE_KEY = ["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET", "HEAD_DIM", "HAS_ALIBI", "HAS_SEQ"]
_SMEM_BYTES = 200 * 1024  # stay under H100's 228 KiB per block with room for the compiler's scratch

# Autotune candidates as (outer block, inner block, num_warps, num_stages): the outer block stays
# resident (query rows in forward and dQ, key rows in dK/dV), the inner one streams. Every candidate
# costs a compile the first time a shape family (head dim, ALiBi, documents, dtype) is seen, about
# 1.7 s each on an H200 host, so each list keeps only the tiles that won somewhere: on an H200
# (make gpu-check, 2026-11-27; benchmarks/RESULTS.md) over head dims 64 and 128, seq 1000-8192 and
# 4-128 batch x heads, the forward picked (64, 64, 4, 3) everywhere but 8192 x 32 heads
# (128, 64, 8, 3), dK/dV (128, 32, 8, 3) at head dim 128 and (64, 64, 4, 3) at 64, dQ (64, 32, 4, 3)
# at 128 and (64, 64, 4, 3) at 64. Eleven other candidates (from register-spill checks with cuobjdump)
# never won, and cost 27 s of compile per shape family.
_FWD_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3)]
_DKDV_CONFIGS = [(128, 32, 8, 3), (64, 64, 4, 3)]
_DQ_CONFIGS = [(64, 32, 4, 3), (64, 64, 4, 3)]


def _configs(candidates: list[tuple[int, int, int, int]], outer_key: str, inner_key: str):
    return [triton.Config({outer_key: o, inner_key: i}, num_warps=w, num_stages=s) for o, i, w, s in candidates]


# Smaller tiles for when no candidate fits (fp32 inputs need twice the bytes of bf16): the first that fits.
_FALLBACK_TILES = [(64, 32, 2), (32, 32, 2), (32, 16, 1)]  # (outer, inner, num_stages), 4 warps


def _prune(outer_key: str, inner_key: str, outer_tiles: int, inner_tiles: int):
    """Drop configs whose tiles (outer resident, inner once per stage) cannot fit in shared memory.

    Tiles hold the inputs' dtype (every kernel's first argument is Q): fp32 needs twice the bytes of bf16.
    When no candidate fits, the first fallback tiling that does.
    """

    def prune(configs, named_args, **kwargs):
        head_dim = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
        element_size = named_args["Q"].element_size()

        def fits(o: int, i: int, stages: int) -> bool:
            return element_size * head_dim * (outer_tiles * o + inner_tiles * i * stages) <= _SMEM_BYTES

        kept = [c for c in configs if fits(c.kwargs[outer_key], c.kwargs[inner_key], c.num_stages)]
        if kept:
            return kept
        o, i, stages = next((t for t in _FALLBACK_TILES if fits(*t)), _FALLBACK_TILES[-1])
        return [triton.Config({outer_key: o, inner_key: i}, num_warps=4, num_stages=stages)]

    return prune


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> _Kernels:
    """Decorate the kernel functions once per mode (``TRITON_INTERPRET`` is read at decoration)."""
    # Lengths are not specialized: q_len == 1 (decoding) would otherwise turn them into constants,
    # changing the type of loop-carried values derived from them (and recompiling per alignment).
    lengths = {"do_not_specialize": ["q_len", "k_len"]}
    fwd = triton.jit(_attn_fwd_kernel, **lengths)
    dkdv = triton.jit(_attn_bwd_dkdv_kernel, **lengths)
    dq = triton.jit(_attn_bwd_dq_kernel, **lengths)
    fwd_tuned = dkdv_tuned = dq_tuned = None
    if not interpret:
        fwd_tuned = triton.autotune(
            _configs(_FWD_CONFIGS, "BLOCK_M", "BLOCK_N"),
            key=_TUNE_KEY,
            prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 1, 2)},
        )(fwd)
        # dK/dV: key blocks stay resident (k, v, dk, dv), query-side tiles (q, dO) stream.
        dkdv_tuned = triton.autotune(
            _configs(_DKDV_CONFIGS, "BLOCK_N", "BLOCK_M"),
            key=_TUNE_KEY + ["group", "splits"],
            prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", 4, 2)},
        )(dkdv)
        dq_tuned = triton.autotune(
            _configs(_DQ_CONFIGS, "BLOCK_M", "BLOCK_N"),
            key=_TUNE_KEY,
            prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 3, 2)},
        )(dq)
    return _Kernels(
        interpret=interpret,
        fwd=fwd,
        fwd_tuned=fwd_tuned,
        delta=triton.jit(_attn_bwd_delta_kernel, do_not_specialize=["q_len"]),
        dkdv=dkdv,
        dkdv_tuned=dkdv_tuned,
        dq=dq,
        dq_tuned=dq_tuned,
    )


# ---------------------------------------------------------------------------------------------
# kernels (plain functions, decorated by _kernels)
#
# Notation: positions are absolute key positions; query row i sits at `off + i` with off = Sk - Sq.
# A (query block, key block) tile is "full" when every query of the block sees every key of the
# block, "diagonal" when the causal mask cuts through it, and skipped when it lies right of it.


def _attn_fwd_kernel(
    Q, K, V, O, LSE, SLOPES, SEQ,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    q_len, k_len, n_heads, group, qk_scale2,
    stride_seq_b, stride_seq_s, SQ_BUCKET, SK_BUCKET, BH_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The last query blocks see the most keys: launch them first so the tail of the grid is short.
    start_m = (tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kvh = h // group
    off = k_len - q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_len
    q_pos = off + offs_m

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + h) * 1.4426950408889634

    # Keys below n_full are visible to every row; keys in [n_full, n_end) need the causal mask.
    n_full = ((off + start_m + 1) // BLOCK_N) * BLOCK_N
    n_end = tl.minimum(k_len, off + start_m + BLOCK_M)
    n_lo = start_m * 0
    if HAS_SEQ:
        seq_base = SEQ + b * stride_seq_b
        # Padded rows read the last real row's id, so min/max below see real ids only.
        q_ids = tl.load(seq_base + (off + tl.minimum(offs_m, q_len - 1)) * stride_seq_s)
        q_min = tl.min(q_ids, 0)
        q_max = tl.max(q_ids, 0)
        # Start at the first key block whose id range meets the block's: for packed documents, the
        # block holding the start of the first query's document.
        n_lo = n_end
        for start_n in range(0, n_end, BLOCK_N):
            k_ids = tl.load(seq_base + tl.minimum(start_n + offs_n, k_len - 1) * stride_seq_s)
            hit = (tl.max(k_ids, 0) >= q_min) & (tl.min(k_ids, 0) <= q_max)
            n_lo = tl.minimum(n_lo, tl.where(hit, start_n, n_end))

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked block then adds exp2(-inf) = 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for stage in tl.static_range(2):
        if stage == 0:
            lo = n_lo
            hi = n_full
        else:
            lo = tl.maximum(n_lo, n_full)
            hi = n_end
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            if stage == 0:
                kv_mask = d_ok[None, :]
            else:
                kv_mask = (cols[:, None] < k_len) & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale2
            if HAS_ALIBI:
                s += slope2 * (cols[None, :] - q_pos[:, None]).to(tl.float32)
            if HAS_SEQ:
                k_ids = tl.load(seq_base + tl.minimum(cols, k_len - 1) * stride_seq_s)
                allowed = q_ids[:, None] == k_ids[None, :]
                if stage == 1:
                    allowed = allowed & (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < k_len)
                s = tl.where(allowed, s, float("-inf"))
            elif stage == 1:
                s = tl.where((cols[None, :] <= q_pos[:, None]) & (cols[None, :] < k_len), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

    # Only padding rows can end with l == 0 (every real query sees at least its own key).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + bh.to(tl.int64) * q_len + offs_m, m_i + tl.log2(l_safe), mask=row_ok)


def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    q_len, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the softmax Jacobian's correction term.
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * q_len + offs_m, delta, mask=offs_m < q_len)


def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SLOPES, SEQ,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    q_len, k_len, n_heads, n_kv, group, splits, softmax_scale, qk_scale2,
    stride_seq_b, stride_seq_s, SQ_BUCKET, SK_BUCKET, BH_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: one key block of one kv head, summed over `group // splits` of its query heads.
    start_n = tl.program_id(0) * BLOCK_N
    pid = tl.program_id(1)
    split = pid % splits
    bkv = pid // splits
    b = (bkv // n_kv).to(tl.int64)
    kvh = bkv % n_kv
    heads_per_split = group // splits
    off = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (cols[:, None] < k_len) & d_ok[None, :]
    k = tl.load(K + b * stride_kb + kvh * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)

    # Query blocks before m_lo see none of these keys; from m_mid on they see all of them; rows from
    # m_tail on are the last, partial query block. m_end rounds q_len up to whole blocks.
    m_end = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    m_lo = (tl.maximum(start_n - off, 0) // BLOCK_M) * BLOCK_M
    m_mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
    m_mid = tl.minimum(m_end, tl.maximum(m_lo, m_mid))
    m_tail = tl.maximum(m_mid, (q_len // BLOCK_M) * BLOCK_M)
    m_stop = m_end
    if HAS_SEQ:
        seq_base = SEQ + b * stride_seq_b
        k_ids = tl.load(seq_base + tl.minimum(cols, k_len - 1) * stride_seq_s)
        k_min = tl.min(k_ids, 0)
        k_max = tl.max(k_ids, 0)
        # Narrow [m_lo, m_stop) to the query blocks whose id range meets this key block's.
        first = m_end
        last = m_lo
        for start_m in range(m_lo, m_end, BLOCK_M):
            q_ids = tl.load(seq_base + (off + tl.minimum(start_m + offs_m, q_len - 1)) * stride_seq_s)
            hit = (tl.max(q_ids, 0) >= k_min) & (tl.min(q_ids, 0) <= k_max)
            first = tl.minimum(first, tl.where(hit, start_m, m_end))
            last = tl.maximum(last, tl.where(hit, start_m + BLOCK_M, m_lo))
        m_lo = tl.maximum(m_lo, first)
        m_stop = last

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for t in range(0, heads_per_split):
        h = kvh * group + split * heads_per_split + t
        bh = b * n_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + h) * 1.4426950408889634
        for stage in tl.static_range(3):
            if stage == 0:  # diagonal blocks
                lo = m_lo
                hi = tl.minimum(m_mid, m_stop)
            elif stage == 1:  # full blocks
                lo = tl.maximum(m_mid, m_lo)
                hi = tl.minimum(m_tail, m_stop)
            else:  # the partial last query block, when it is not diagonal already
                lo = tl.maximum(m_tail, m_lo)
                hi = m_stop
            for start_m in range(lo, hi, BLOCK_M):
                rows = start_m + offs_m
                q_pos = off + rows
                if stage == 1:
                    q_mask = d_ok[None, :]
                else:
                    q_mask = (rows[:, None] < q_len) & d_ok[None, :]
                q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
                lse2 = tl.load(LSE + bh * q_len + rows, mask=rows < q_len, other=0.0)
                delta = tl.load(DELTA + bh * q_len + rows, mask=rows < q_len, other=0.0)
                # Transposed scores: rows are keys, columns are queries.
                s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale2
                if HAS_ALIBI:
                    s += slope2 * (cols[:, None] - q_pos[None, :]).to(tl.float32)
                p = tl.exp2(s - lse2[None, :])
                if HAS_SEQ:
                    q_ids = tl.load(seq_base + (off + tl.minimum(rows, q_len - 1)) * stride_seq_s)
                    allowed = k_ids[:, None] == q_ids[None, :]
                    if stage != 1:
                        allowed = allowed & (cols[:, None] <= q_pos[None, :]) & (rows[None, :] < q_len)
                    p = tl.where(allowed, p, 0.0)
                elif stage != 1:
                    p = tl.where((cols[:, None] <= q_pos[None, :]) & (rows[None, :] < q_len), p, 0.0)
                dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
                dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                ds = p * (dp - delta[None, :])
                dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    out_mask = (cols[:, None] < k_len) & d_ok[None, :]
    slot = kvh * splits + split
    offs = b * stride_dkb + slot * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :]
    tl.store(DK + offs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=out_mask)


def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SLOPES, SEQ,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    q_len, k_len, n_heads, group, softmax_scale, qk_scale2,
    stride_seq_b, stride_seq_s, SQ_BUCKET, SK_BUCKET, BH_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Same walk over key blocks as the forward, recomputing P from the saved log-sum-exp.
    start_m = (tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kvh = h // group
    off = k_len - q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_len
    q_pos = off + offs_m
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=q_mask, other=0.0
    )
    lse2 = tl.load(LSE + bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + h) * 1.4426950408889634

    n_full = ((off + start_m + 1) // BLOCK_N) * BLOCK_N
    n_end = tl.minimum(k_len, off + start_m + BLOCK_M)
    n_lo = start_m * 0
    if HAS_SEQ:
        seq_base = SEQ + b * stride_seq_b
        q_ids = tl.load(seq_base + (off + tl.minimum(offs_m, q_len - 1)) * stride_seq_s)
        q_min = tl.min(q_ids, 0)
        q_max = tl.max(q_ids, 0)
        n_lo = n_end
        for start_n in range(0, n_end, BLOCK_N):
            k_ids = tl.load(seq_base + tl.minimum(start_n + offs_n, k_len - 1) * stride_seq_s)
            hit = (tl.max(k_ids, 0) >= q_min) & (tl.min(k_ids, 0) <= q_max)
            n_lo = tl.minimum(n_lo, tl.where(hit, start_n, n_end))

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for stage in tl.static_range(2):
        if stage == 0:
            lo = n_lo
            hi = n_full
        else:
            lo = tl.maximum(n_lo, n_full)
            hi = n_end
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            if stage == 0:
                kv_mask = d_ok[None, :]
            else:
                kv_mask = (cols[:, None] < k_len) & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale2
            if HAS_ALIBI:
                s += slope2 * (cols[None, :] - q_pos[:, None]).to(tl.float32)
            p = tl.exp2(s - lse2[:, None])
            if HAS_SEQ:
                k_ids = tl.load(seq_base + tl.minimum(cols, k_len - 1) * stride_seq_s)
                allowed = q_ids[:, None] == k_ids[None, :]
                if stage == 1:
                    allowed = allowed & (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < k_len)
                p = tl.where(allowed, p, 0.0)
            elif stage == 1:
                p = tl.where((cols[None, :] <= q_pos[:, None]) & (cols[None, :] < k_len), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
        (dq * softmax_scale).to(DQ.dtype.element_ty),
        mask=q_mask,
    )
