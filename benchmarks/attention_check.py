"""Every attention backend against the fp32 reference, in bf16, on the shapes that break kernels.

    python benchmarks/attention_check.py --out check.json          # GPU: real shapes
    python benchmarks/attention_check.py --cpu --out check.json    # CPU: tiny shapes (triton interpreted)

The cases cover partial tiles (sequence lengths that are not a multiple of any block size), head
dims 64, 112 (mpt-30b's, padded inside the triton kernel) and 128, grouped-query attention and
packed documents, with and without ALiBi. Each backend gets the same bf16 q, k, v and output
gradient; the reference is the `torch` backend on fp32 copies of them. The error of the output and
of dq, dk, dv is relative: ||x - ref|| / ||ref||. Exit code 1 when any comparison exceeds the bf16
tolerance; a backend that cannot run here (flash without flash-attn, flex's backward off GPU) is
listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

try:
    import mptlike  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mptlike.errors import MptlikeError
from mptlike.ops.alibi import alibi_slopes
from mptlike.ops.attention import ATTN_IMPLS, attention, check_attn_impl

TOLERANCE = 2e-2  # bf16 keeps 8 mantissa bits: ~4e-3 per rounding, a few roundings deep


@dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    alibi: bool
    documents: bool

    @property
    def name(self) -> str:
        return (f"B{self.batch} S{self.seq} H{self.n_heads}/{self.n_kv_heads} D{self.head_dim}"
                f"{' alibi' if self.alibi else ''}{' docs' if self.documents else ''}")


GPU_CASES = [
    Case(2, 2048, 16, 16, 128, True, False),  # full tiles, mpt-1b's heads
    Case(2, 1000, 8, 8, 64, True, True),  # partial tiles, documents
    Case(1, 777, 8, 2, 112, True, True),  # mpt-30b's head dim, GQA, partial tiles
    Case(2, 1024, 8, 2, 128, False, True),  # GQA and documents without ALiBi
    Case(1, 333, 4, 1, 64, True, False),  # multi-query, a short partial tile
]
CPU_CASES = [
    Case(1, 40, 4, 2, 16, True, True),
    Case(2, 33, 4, 4, 32, True, False),
]


@dataclass
class Row:
    impl: str
    case: str
    status: str  # ok | FAIL | error | n/a
    errors: dict[str, float] = field(default_factory=dict)  # out, dq, dk, dv
    note: str = ""
    seconds: float = 0.0  # this backend on this case, compiling and autotuning included


def _inputs(case: Case, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, torch.bfloat16)

    q = randn(case.batch, case.seq, case.n_heads, case.head_dim)
    k = randn(case.batch, case.seq, case.n_kv_heads, case.head_dim)
    v = randn(case.batch, case.seq, case.n_kv_heads, case.head_dim)
    grad = randn(case.batch, case.seq, case.n_heads, case.head_dim)
    sequence_id = None
    if case.documents:  # three documents of uneven lengths per row, different in each row
        starts = torch.rand(case.batch, case.seq, generator=gen) < 3 / case.seq
        starts[:, 0] = False
        sequence_id = torch.cumsum(starts.long(), dim=1).to(device)
    return q, k, v, grad, sequence_id


def _run(impl: str, q, k, v, grad, sequence_id, case: Case, backward: bool):
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    slopes = alibi_slopes(case.n_heads, device=q.device) if case.alibi else None
    out = attention(q, k, v, impl=impl, softmax_scale=1 / math.sqrt(case.head_dim), alibi_slopes=slopes,
                    sequence_id=sequence_id)
    if not backward:
        return {"out": out.detach()}
    out.backward(grad.to(out.dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def available(device: torch.device) -> dict[str, str]:
    """Backend -> why it cannot run here ('' when it can)."""
    reasons = {}
    for impl in ATTN_IMPLS:
        if impl in ("torch", "auto"):  # the reference itself; a choice among the others
            continue
        try:
            if impl == "flash" and device.type != "cuda":
                raise MptlikeError("flash-attn runs on CUDA only")
            check_attn_impl(impl)
            reasons[impl] = ""
        except MptlikeError as exc:
            reasons[impl] = str(exc).split(";")[0]
    return reasons


HEADER = f"{'impl':<7} {'case':<34} {'status':<6} {'out':>8} {'dq':>8} {'dk':>8} {'dv':>8} {'s':>6}  note"


def format_row(r: Row) -> str:
    errs = " ".join(f"{r.errors[n]:8.1e}" if n in r.errors else f"{'-':>8}" for n in ("out", "dq", "dk", "dv"))
    return f"{r.impl:<7} {r.case:<34} {r.status:<6} {errs} {r.seconds:6.1f}  {r.note}"


def check(cases: list[Case], device: torch.device) -> list[Row]:
    """Every backend on every case; each row printed as it ends (seconds include compiling and tuning)."""
    print(HEADER, flush=True)
    rows = []
    for i, case in enumerate(cases):
        q, k, v, grad, sequence_id = _inputs(case, device, seed=i)
        ref = _run("torch", q.float(), k.float(), v.float(), grad.float(), sequence_id, case, backward=True)
        for impl, reason in available(device).items():
            if reason:
                rows.append(Row(impl, case.name, "n/a", note=reason))
                print(format_row(rows[-1]), flush=True)
                continue
            backward = not (impl == "flex" and device.type != "cuda")
            started = time.monotonic()
            try:
                got = _run(impl, q, k, v, grad, sequence_id, case, backward)
            except (RuntimeError, MptlikeError) as exc:
                rows.append(Row(impl, case.name, "error", note=str(exc).splitlines()[0][:160],
                                seconds=time.monotonic() - started))
                print(format_row(rows[-1]), flush=True)
                continue
            errors = {name: _relative(got[name], ref[name]) for name in got}
            ok = all(e <= TOLERANCE for e in errors.values())
            rows.append(Row(impl, case.name, "ok" if ok else "FAIL", errors,
                            "" if backward else "forward only (flex has no backward off GPU)",
                            seconds=time.monotonic() - started))
            print(format_row(rows[-1]), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (triton under TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    rows = check(GPU_CASES if on_gpu else CPU_CASES, device)
    if args.out:
        payload = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "dtype": "bfloat16",
                   "reference": "torch backend on fp32 copies", "tolerance": TOLERANCE,
                   "rows": [asdict(r) for r in rows]}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if any(r.status in ("FAIL", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
