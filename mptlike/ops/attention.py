"""Causal attention with optional ALiBi and packed-document masks, behind one call.

Every backend computes the same function (the ``torch`` backend is the readable reference):

    out[b, i, h] = softmax_j(scale * q[b, i, h] . k[b, j, g] + slope[h] * (j - pos_i) + mask) @ v[b, :, g]

with ``pos_i = Sk - Sq + i`` (queries are the last ``Sq`` of the ``Sk`` positions, so KV-cache
decoding with ``Sq == 1`` needs no special case), ``g = h // (H // Hkv)`` (grouped-query
attention), ``mask = -inf`` where ``j > pos_i`` or, given ``sequence_id``, where key ``j`` belongs to
another document than query ``i``. Packed documents are contiguous runs of equal ids.

Backends (``auto``, the default, picks one per device: `resolve_attn_impl`):
    torch  explicit fp32 scores; slow, exact, the reference the others are tested against.
    sdpa   ``F.scaled_dot_product_attention``; the mask-free causal case takes the flash kernel,
           ALiBi or documents fold into one additive (or boolean) mask; the causal ALiBi mask is
           built once per forward and shared by the layers (`mptlike.ops.alibi.causal_alibi_bias`).
    flex   ``flex_attention`` with ALiBi as a score_mod and a (block-sparse) causal/document
           BlockMask; compiled on GPU, eager forward-only on CPU.
    flash  flash-attn 2 with its native ALiBi; documents go through the varlen kernel.
    triton our FlashAttention-2 Triton kernel (mptlike.ops.triton_attention): ALiBi from the slopes in
           registers, causal and document block skipping, GQA; CUDA (or TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mptlike.errors import MptlikeError
from mptlike.ops.alibi import alibi_bias, causal_alibi_bias

ATTN_IMPLS: tuple[str, ...] = ("torch", "sdpa", "flex", "flash", "triton")  # the backends
ATTN_CHOICES: tuple[str, ...] = ("auto", *ATTN_IMPLS)  # what model.attn_impl accepts

_FLASH_INSTALL_HINT = "pip install 'mptlike[flash]'"


def resolve_attn_impl(name: str, device_type: str, *, attn_pdrop: float = 0.0, head_dim: int | None = None) -> str:
    """The backend that model.attn_impl=``name`` means on ``device_type`` (``"cuda"``, ``"cpu"``, ...).

    A named backend is itself. ``auto`` is the fastest correct backend present: on CUDA, ``triton``
    when triton imports, else ``flex``, else ``sdpa``; ``sdpa`` on every other device. Triton and flex
    have no attention dropout, so ``attn_pdrop > 0`` means ``sdpa``; heads wider than the Triton
    kernel's limit pass over it.
    """
    if name not in ATTN_CHOICES:
        raise MptlikeError(
            f"model.attn_impl={name!r} is not a known attention backend; use one of {', '.join(ATTN_CHOICES)}."
        )
    if name != "auto":
        return name
    if device_type != "cuda" or attn_pdrop > 0:
        return "sdpa"
    if _runs_on_cuda("triton") and (head_dim is None or head_dim <= _TRITON_MAX_HEAD_DIM):
        return "triton"
    return "flex" if _runs_on_cuda("flex") else "sdpa"


_TRITON_MAX_HEAD_DIM = 256  # mptlike.ops.triton_attention's kernels hold a head in one tile


@functools.cache
def _runs_on_cuda(impl: str) -> bool:
    """Whether ``impl``'s package imports here (asked once per process)."""
    try:
        if impl == "triton":
            from mptlike.ops.triton_attention import check_triton_attention

            check_triton_attention("cuda")
        else:
            check_attn_impl(impl)
    except MptlikeError:
        return False
    return True


def check_attn_impl(impl: str) -> None:
    """Raise MptlikeError when ``impl`` is not a known backend or cannot run in this environment."""
    if impl == "auto":
        return  # it only ever picks a backend that is present
    if impl not in ATTN_IMPLS:
        raise MptlikeError(
            f"model.attn_impl={impl!r} is not a known attention backend; use one of {', '.join(ATTN_CHOICES)}."
        )
    if impl == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as exc:
            raise MptlikeError(
                f"model.attn_impl=flex needs torch.nn.attention.flex_attention, which torch {torch.__version__} lacks "
                f"({exc}); upgrade torch or use model.attn_impl=sdpa."
            ) from exc
    if impl == "flash":
        _import_flash_attn()
    if impl == "triton":
        # Raises naming `pip install 'mptlike[triton]'` when triton is missing, or the fix when
        # there is no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU, slowly).
        from mptlike.ops.triton_attention import check_triton_attention

        check_triton_attention()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    impl: str,
    softmax_scale: float,
    alibi_slopes: Tensor | None,
    sequence_id: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Causal attention; q ``(B, Sq, H, D)``, k and v ``(B, Sk, Hkv, D)``; returns ``(B, Sq, H, D)`` in q's dtype.

    ``alibi_slopes`` is ``(H,)`` float32 or None; ``sequence_id`` is ``(B, Sk)`` integer or None.
    ``dropout_p`` is applied to the attention probabilities; pass 0 outside training.
    ``impl="auto"`` resolves on q's device (`resolve_attn_impl`); training resolves it once, up front.
    """
    if impl == "auto":
        impl = resolve_attn_impl(impl, q.device.type, attn_pdrop=dropout_p, head_dim=q.shape[-1])
    backend = _BACKENDS.get(impl)
    if backend is None:
        check_attn_impl(impl)
    return backend(q, k, v, softmax_scale, alibi_slopes, sequence_id, dropout_p)


# ---------------------------------------------------------------------------------------------
# shared pieces


def _allowed_mask(q_len: int, k_len: int, sequence_id: Tensor | None, device: torch.device) -> Tensor:
    """Boolean ``(B or 1, 1, q_len, k_len)``: True where query i may attend to key j."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if sequence_id is not None:
        q_ids = sequence_id[:, k_len - q_len :]
        same_doc = q_ids[:, :, None] == sequence_id[:, None, :]
        allowed = allowed & same_doc[:, None]
    return allowed


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``(B, S, Hkv, D) -> (B, S, Hkv * n_rep, D)`` so that query head h reads kv head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# torch: the reference


def _torch_attention(q, k, v, scale, slopes, sequence_id, dropout_p):
    _, q_len, n_heads, _ = q.shape
    k_len, n_kv = k.shape[1], k.shape[2]
    k = _repeat_kv(k, n_heads // n_kv)
    v = _repeat_kv(v, n_heads // n_kv)
    # Autocast would run these matmuls in bf16; the reference keeps the scores in fp32.
    with _autocast_off(q.device.type):
        scores = torch.matmul(q.transpose(1, 2).float(), k.permute(0, 2, 3, 1).float()) * scale
        if slopes is not None:
            scores = scores + alibi_bias(slopes, q_len, k_len, device=q.device)
        scores = scores.masked_fill(~_allowed_mask(q_len, k_len, sequence_id, q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        out = torch.matmul(probs, v.transpose(1, 2).float())
    return out.transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# sdpa


def _sdpa_attention(q, k, v, scale, slopes, sequence_id, dropout_p):
    _, q_len, n_heads, _ = q.shape
    k_len, n_kv = k.shape[1], k.shape[2]
    mask = None
    is_causal = False
    if slopes is None and sequence_id is None:
        if q_len == k_len:
            is_causal = True  # no S x S tensor at all: the flash / cuDNN kernels take this path
        elif q_len > 1:
            # sdpa's is_causal aligns queries to the start of the keys; ours sit at the end.
            mask = _allowed_mask(q_len, k_len, None, q.device)
        # q_len == 1: the single query is the newest token and sees every key, so nothing to mask.
    elif slopes is None:
        mask = _allowed_mask(q_len, k_len, sequence_id, q.device)
    else:
        # Shared by every layer of this forward: never modify it in place.
        mask = causal_alibi_bias(slopes.to(q.device), q_len, k_len, dtype=q.dtype)
        if sequence_id is not None:
            # (B, H, Sq, Sk), built per layer: packed documents are better served by triton, flex or flash.
            same_doc = _allowed_mask(q_len, k_len, sequence_id, q.device)
            mask = torch.where(same_doc, mask, torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
    enable_gqa = n_kv != n_heads
    # Only the flash kernel (mask-free, 16-bit) reads grouped kv heads natively; with a mask or fp32
    # on GPU, enable_gqa would fall back to the math kernel, so materialize the repeated heads instead.
    if enable_gqa and (mask is not None or (q.is_cuda and q.dtype == torch.float32)):
        k = _repeat_kv(k, n_heads // n_kv)
        v = _repeat_kv(v, n_heads // n_kv)
        enable_gqa = False
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# flex


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=32)
def _causal_block_mask(q_len: int, k_len: int, device: torch.device):
    """Causal BlockMask shared by every batch and head; cached because it depends only on the shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = k_len - q_len

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return create_block_mask(causal, None, None, q_len, k_len, device=device)


def _document_block_mask(sequence_id: Tensor, q_len: int, k_len: int):
    """Causal and same-document BlockMask for this batch (built per call: it depends on the data)."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = k_len - q_len

    def causal_same_doc(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        return (q_pos >= kv_idx) & (sequence_id[b, q_pos] == sequence_id[b, kv_idx])

    batch = sequence_id.shape[0]
    return create_block_mask(
        causal_same_doc, batch, None, q_len, k_len, device=sequence_id.device, _compile=sequence_id.is_cuda
    )


def _alibi_score_mod(slopes: Tensor, offset: int) -> Callable:
    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx - offset)

    return alibi


def _flex_attention(q, k, v, scale, slopes, sequence_id, dropout_p):
    if dropout_p > 0.0:
        raise MptlikeError(
            f"model.attn_impl=flex has no attention dropout but model.attn_pdrop={dropout_p}; "
            "set model.attn_pdrop=0 or use model.attn_impl=sdpa."
        )
    from torch.nn.attention.flex_attention import flex_attention

    q_len, n_heads = q.shape[1], q.shape[2]
    k_len, n_kv = k.shape[1], k.shape[2]
    if sequence_id is None:
        block_mask = _causal_block_mask(q_len, k_len, q.device)
    else:
        block_mask = _document_block_mask(sequence_id, q_len, k_len)
    score_mod = None
    if slopes is not None:
        score_mod = _alibi_score_mod(slopes.to(device=q.device, dtype=torch.float32), k_len - q_len)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=n_kv != n_heads)
    if q.is_cuda:
        out = _compiled_flex_attention()(*args, **kwargs)
    else:
        # Eager flex off GPU is an unfused path (forward only); its speed warning is expected.
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*without torch.compile.*")
                out = flex_attention(*args, **kwargs)
        except NotImplementedError as exc:
            raise MptlikeError(
                f"model.attn_impl=flex cannot run here on {q.device.type} ({str(exc).splitlines()[0]}); "
                "train on CPU with model.attn_impl=sdpa, or run flex on a GPU."
            ) from exc
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# flash


def _import_flash_attn():
    try:
        import flash_attn
    except (ImportError, OSError, RuntimeError) as exc:
        raise MptlikeError(
            f"model.attn_impl=flash needs flash-attn, which does not import here ({exc}); "
            f"install it with {_FLASH_INSTALL_HINT} on a CUDA machine or use model.attn_impl=sdpa."
        ) from exc
    return flash_attn


def _varlen_layout(sequence_id: Tensor, q_len: int) -> tuple[Tensor | None, Tensor, Tensor, int, int]:
    """Documents as flash-attn varlen sequences.

    Each contiguous run of equal ids in a row is one sequence. Its queries are the run's positions
    among the last ``q_len`` of the row, so the queries keep their flat ``(B * q_len)`` order. Runs
    that hold no query (only while decoding) are dropped with their keys, since no query sees them.
    Returns the flat indices of the kept keys into ``(B * Sk)`` (None when all are kept), the int32
    ``cu_seqlens`` of queries and keys, and the longest query and key lengths. The ``.item()`` calls
    are a graph break under torch.compile; they are cheap next to the attention they set up.
    """
    batch, k_len = sequence_id.shape
    starts = torch.ones_like(sequence_id, dtype=torch.bool)
    starts[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
    run = torch.cumsum(starts.flatten(), 0) - 1  # run index of every (row, position)
    n_runs = int(run[-1].item()) + 1
    k_counts = torch.bincount(run, minlength=n_runs)
    q_counts = torch.bincount(run.view(batch, k_len)[:, k_len - q_len :].flatten(), minlength=n_runs)
    kept = q_counts > 0
    k_index = None
    if q_len != k_len:
        k_index = torch.nonzero(kept[run]).flatten()
        q_counts, k_counts = q_counts[kept], k_counts[kept]
    zero = torch.zeros(1, dtype=torch.int32, device=sequence_id.device)
    cu_q = torch.cat([zero, torch.cumsum(q_counts, 0).to(torch.int32)])
    cu_k = torch.cat([zero, torch.cumsum(k_counts, 0).to(torch.int32)])
    return k_index, cu_q, cu_k, int(q_counts.max().item()), int(k_counts.max().item())


def _flash_attention(q, k, v, scale, slopes, sequence_id, dropout_p):
    flash_attn = _import_flash_attn()
    out_dtype = q.dtype
    if out_dtype not in (torch.float16, torch.bfloat16):
        # flash-attn kernels exist only for 16-bit inputs.
        q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
    # flash-attn adds -slope * |i - j|; under the causal mask j <= i, that is our slope * (j - i).
    slopes = None if slopes is None else slopes.to(device=q.device, dtype=torch.float32)
    batch, q_len, n_heads, head_dim = q.shape
    if sequence_id is None:
        out = flash_attn.flash_attn_func(
            q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=True, alibi_slopes=slopes
        )
        return out.to(out_dtype)
    k_len, n_kv = k.shape[1], k.shape[2]
    k_index, cu_q, cu_k, max_q, max_k = _varlen_layout(sequence_id, q_len)
    k_flat = k.reshape(batch * k_len, n_kv, head_dim)
    v_flat = v.reshape(batch * k_len, n_kv, head_dim)
    if k_index is not None:
        k_flat, v_flat = k_flat[k_index], v_flat[k_index]
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(batch * q_len, n_heads, head_dim),
        k_flat,
        v_flat,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=True,
        alibi_slopes=slopes,
    )
    return out.view(batch, q_len, n_heads, head_dim).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# triton


def _triton_attention(q, k, v, scale, slopes, sequence_id, dropout_p):
    if dropout_p > 0.0:
        raise MptlikeError(
            f"model.attn_impl=triton has no attention dropout but model.attn_pdrop={dropout_p}; "
            "set model.attn_pdrop=0 or use model.attn_impl=sdpa."
        )
    # Imported here: the kernels compile on first use and triton is an optional extra.
    from mptlike.ops.triton_attention import triton_attention

    return triton_attention(q, k, v, softmax_scale=scale, alibi_slopes=slopes, sequence_id=sequence_id)


_BACKENDS: dict[str, Callable[..., Tensor]] = {
    "torch": _torch_attention,
    "sdpa": _sdpa_attention,
    "flex": _flex_attention,
    "flash": _flash_attention,
    "triton": _triton_attention,
}
