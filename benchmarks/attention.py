"""Attention backends: forward / backward time, TFLOP/s and peak memory over a sweep of shapes.

    python benchmarks/attention.py                 # GPU sweep (bf16, seq 512..16384), or tiny CPU sweep without CUDA
    python benchmarks/attention.py --cpu           # force the CPU sweep (fp32, small shapes)
    python benchmarks/attention.py --impls sdpa flash --seqs 2048 8192 --out results.json

Every backend is first checked against the ``torch`` reference on the same inputs (forward,
batch 1, at most 4 query heads, so the reference fits in memory at long sequences); a backend
that disagrees is reported as FAIL and still timed. FLOPs count causal attention only:
forward = 4 * B * H * Sq * Sk * D / 2 (two matmuls, half the score matrix), backward = 2.5x forward.
GPU times come from ``triton.testing.do_bench`` when triton imports, else CUDA events; CPU times
are medians of ``time.perf_counter``. Peak memory is the extra CUDA memory one forward+backward
allocates on top of its inputs (not measured on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

try:
    from mptlike.errors import MptlikeError
    from mptlike.ops.alibi import alibi_slopes
    from mptlike.ops.attention import ATTN_IMPLS, attention, check_attn_impl
except ImportError:  # run from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mptlike.errors import MptlikeError
    from mptlike.ops.alibi import alibi_slopes
    from mptlike.ops.attention import ATTN_IMPLS, attention, check_attn_impl

BWD_FLOP_FACTOR = 2.5
CHECK_MAX_HEADS = 4
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def fwd_flops(self) -> float:
        return 4 * self.batch * self.n_heads * self.seq * self.seq * self.head_dim / 2


@dataclass
class Result:
    impl: str
    batch: int
    seq: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    check: str = ""  # "ok", "FAIL", "ref" (the reference itself) or "n/a"
    max_abs_err: float | None = None
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_tflops: float | None = None
    bwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    peak_mem_gib: float | None = None
    notes: list[str] = field(default_factory=list)


# Per-device sweep defaults: GPU at 16k tokens per batch and d_model 2048, CPU tiny enough for a minute.
GPU_DEFAULTS = dict(seqs=[512, 1024, 2048, 4096, 8192, 16384], head_dims=[64, 128], batch_tokens=16384, d_model=2048)
CPU_DEFAULTS = dict(seqs=[128, 256], head_dims=[32], batch_tokens=512, d_model=256)


def available_impls(device: torch.device) -> list[str]:
    impls = []
    for impl in ATTN_IMPLS:
        if impl == "flash" and device.type != "cuda":
            continue
        try:
            check_attn_impl(impl)
        except MptlikeError:
            continue
        impls.append(impl)
    return impls


def make_timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """A function that returns the median milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            pass

        def cuda_events(fn):
            for _ in range(3):
                fn()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        return cuda_events

    def wall_clock(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return wall_clock


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    q = randn(shape.batch, shape.seq, shape.n_heads, shape.head_dim)
    k = randn(shape.batch, shape.seq, shape.n_kv_heads, shape.head_dim)
    v = randn(shape.batch, shape.seq, shape.n_kv_heads, shape.head_dim)
    return q, k, v


def check_against_reference(impl: str, shape: Shape, dtype, device, use_alibi: bool) -> float:
    """Max abs difference to the torch reference on batch 1 and at most CHECK_MAX_HEADS query heads."""
    n_rep = shape.n_heads // shape.n_kv_heads
    n_kv = max(1, min(shape.n_kv_heads, CHECK_MAX_HEADS // n_rep))
    small = Shape(1, shape.seq, n_kv * n_rep, n_kv, shape.head_dim)
    q, k, v = _inputs(small, dtype, device, seed=1)
    # The slopes of the first heads of the full model, so the check sees the real bias.
    slopes = alibi_slopes(shape.n_heads, device=device)[: small.n_heads] if use_alibi else None
    kwargs = dict(softmax_scale=1 / math.sqrt(shape.head_dim), alibi_slopes=slopes)
    with torch.no_grad():
        out = attention(q, k, v, impl=impl, **kwargs).float()
        ref = attention(q, k, v, impl="torch", **kwargs).float()
    return (out - ref).abs().max().item()


def bench_one(impl: str, shape: Shape, dtype, device, use_alibi: bool, timer) -> Result:
    result = Result(impl, shape.batch, shape.seq, shape.n_heads, shape.n_kv_heads, shape.head_dim)
    try:
        if impl == "torch":
            result.check = "ref"
        else:
            result.max_abs_err = check_against_reference(impl, shape, dtype, device, use_alibi)
            result.check = "ok" if result.max_abs_err <= CHECK_TOLERANCE[dtype] else "FAIL"
        q, k, v = (t.requires_grad_(True) for t in _inputs(shape, dtype, device))
        slopes = alibi_slopes(shape.n_heads, device=device) if use_alibi else None
        kwargs = dict(impl=impl, softmax_scale=1 / math.sqrt(shape.head_dim), alibi_slopes=slopes)

        def forward():
            return attention(q, k, v, **kwargs)

        # Inference-style forward: inputs that need no grad (eager flex on CPU refuses any others).
        q_, k_, v_ = q.detach(), k.detach(), v.detach()
        with torch.no_grad():
            result.fwd_ms = timer(lambda: attention(q_, k_, v_, **kwargs))
        result.fwd_tflops = shape.fwd_flops / (result.fwd_ms * 1e-3) / 1e12
        if impl == "flex" and device.type != "cuda":
            result.notes.append("flex has no CPU backward")
            return result
        grad_out = torch.randn_like(q)

        def forward_backward():
            torch.autograd.backward(forward(), grad_out)

        out = forward()
        # Backward alone replays one graph (retain_graph), which a compiled backward that donates its
        # buffers (flex's) refuses: compiled graphs built here keep their buffers instead.
        result.bwd_ms = timer(lambda out=out: torch.autograd.backward(out, grad_out, retain_graph=True))
        del out
        result.fwd_bwd_ms = timer(forward_backward)
        result.bwd_tflops = BWD_FLOP_FACTOR * shape.fwd_flops / (result.bwd_ms * 1e-3) / 1e12
        result.fwd_bwd_tflops = (1 + BWD_FLOP_FACTOR) * shape.fwd_flops / (result.fwd_bwd_ms * 1e-3) / 1e12
        if device.type == "cuda":
            q.grad = k.grad = v.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward_backward()
            torch.cuda.synchronize()
            result.peak_mem_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.cuda.OutOfMemoryError:
        result.notes.append("out of memory")
    except (RuntimeError, MptlikeError) as exc:
        result.notes.append(f"error: {str(exc).splitlines()[0][:120]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_HEADER = (
    f"{'impl':<6} {'B':>3} {'seq':>6} {'H':>3} {'Hkv':>3} {'D':>4} {'check':>5} {'maxerr':>8} "
    f"{'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'fwd TF/s':>8} {'bwd TF/s':>8} {'f+b TF/s':>8} {'peak GiB':>8}  notes"
)


def format_row(r: Result) -> str:
    return (
        f"{r.impl:<6} {r.batch:>3} {r.seq:>6} {r.n_heads:>3} {r.n_kv_heads:>3} {r.head_dim:>4} {r.check:>5} "
        f"{_fmt(r.max_abs_err, '8.1e')} {_fmt(r.fwd_ms, '9.3f')} {_fmt(r.bwd_ms, '9.3f')} "
        f"{_fmt(r.fwd_bwd_ms, '9.3f')} {_fmt(r.fwd_tflops, '8.3g')} {_fmt(r.bwd_tflops, '8.3g')} "
        f"{_fmt(r.fwd_bwd_tflops, '8.3g')} {_fmt(r.peak_mem_gib, '8.2f')}  {'; '.join(r.notes)}"
    )


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the small fp32 CPU sweep even when CUDA is present")
    parser.add_argument(
        "--impls", nargs="+", choices=ATTN_IMPLS, help="backends to time (default: every one available)"
    )
    parser.add_argument("--seqs", nargs="+", type=int, help="sequence lengths (default: the sweep for the device)")
    parser.add_argument("--head-dims", nargs="+", type=int, help="head dimensions (default: the sweep for the device)")
    parser.add_argument("--batch-tokens", type=int, help="tokens per batch; batch = tokens // seq")
    parser.add_argument("--d-model", type=int, help="model width; heads = d_model // head_dim")
    parser.add_argument("--gqa-ratio", type=int, default=4, help="query heads per kv head in the GQA rows")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--no-alibi", action="store_true", help="time plain causal attention without ALiBi")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement without triton")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def build_shapes(args: argparse.Namespace, on_gpu: bool) -> list[Shape]:
    """MHA and GQA rows for every head dim and sequence length; batch keeps the tokens per batch fixed."""
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    seqs = args.seqs or defaults["seqs"]
    head_dims = args.head_dims or defaults["head_dims"]
    tokens = args.batch_tokens or defaults["batch_tokens"]
    d_model = args.d_model or defaults["d_model"]
    shapes = []
    for head_dim in head_dims:
        n_heads = max(1, d_model // head_dim)
        kv_options = [n_heads]
        if args.gqa_ratio > 1 and n_heads % args.gqa_ratio == 0:
            kv_options.append(n_heads // args.gqa_ratio)
        for n_kv in kv_options:
            for seq in seqs:
                shapes.append(Shape(max(1, tokens // seq), seq, n_heads, n_kv, head_dim))
    return shapes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False  # see bench_one: backward timed alone, graph retained
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    on_gpu = device.type == "cuda"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("bf16" if on_gpu else "fp32")]
    available = available_impls(device)
    impls = [i for i in (args.impls or available) if i in available]
    timer = make_timer(device, args.repeats)
    use_alibi = not args.no_alibi
    device_name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}  torch {torch.__version__}  dtype {dtype}  alibi {use_alibi}")
    print(f"backends: {', '.join(impls)}")
    print(f"FLOPs: causal, fwd = 4*B*H*S*S*D/2, bwd = {BWD_FLOP_FACTOR}x fwd")
    print(TABLE_HEADER)
    print("-" * len(TABLE_HEADER))
    results = []
    for shape in build_shapes(args, on_gpu):
        for impl in impls:
            results.append(bench_one(impl, shape, dtype, device, use_alibi, timer))
            print(format_row(results[-1]), flush=True)
    if args.out is not None:
        payload = {
            "device": device_name,
            "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."),
            "alibi": use_alibi,
            "flops_formula": f"causal: fwd = 4*B*H*S*S*D/2, bwd = {BWD_FLOP_FACTOR} * fwd",
            "results": [asdict(r) for r in results],
        }
        write_json(args.out, payload)
        print(f"wrote {args.out}")
    return 1 if any(r.check == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
