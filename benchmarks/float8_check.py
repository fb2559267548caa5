"""float8 training (parallel.float8, torchao) against bf16 on one device: throughput, MFU and a short loss curve.

    python benchmarks/float8_check.py --out float8.json        # mpt-1b, seq 2048, micro-batch 8, compiled blocks
    python benchmarks/float8_check.py --cpu --out float8.json  # tiny shapes on CPU (torch's CPU float8 matmul)

Each variant (bf16, float8 tensorwise, float8 rowwise) builds the same model from the same seed (on meta, then
mptlike.parallel: float8 layers, compiled blocks, then the weights) and trains --steps steps on the same batches:
a cycle of --batches random batches, so that the loss falls as the model learns them. Every step runs under bf16
autocast with fused AdamW (foreach on CPU). Throughput is the median time of the steps after --warmup (compilation
happens in those); MFU is against the bf16 datasheet peak (6N + 12 L d seq FLOPs per token), as torchtitan and
torchao report float8 runs: float8's own tensor-core peak is twice that. The loss curves are compared step by step
(the largest relative difference from bf16's). A variant is skipped, with a note, when --time-budget-s would run
out: the check is one stage of benchmarks/gpu_check.py (`--only float8`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import mptlike  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import make_optimizer  # benchmarks/throughput.py, beside this file

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel import ParallelPlan, materialize, parallelize
from mptlike.train.flops import FLOPS_FORMULA, peak_flops

VARIANTS = ("bf16", "tensorwise", "rowwise")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, cfg: MPTConfig, batches: torch.Tensor, args: argparse.Namespace,
                device: torch.device) -> dict:
    """Train `args.steps` steps of one variant; its losses, step times and peak memory."""
    torch._dynamo.reset()  # each variant compiles its own blocks, from a clean cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    plan = ParallelPlan(compile=args.compile, float8=name != "bf16",
                        float8_recipe=name if name != "bf16" else "tensorwise")
    parallelize(model, plan)
    materialize(model, device, seed=args.seed)
    model.train()
    optimizer = make_optimizer(model.parameters(), device)
    for group in optimizer.param_groups:
        group["lr"] = args.lr
    losses, seconds = [], []
    started = time.perf_counter()
    for step in range(args.steps):
        tokens = batches[step % len(batches)]
        _sync(device)
        begin = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())  # a sync: the step has finished
        seconds.append(time.perf_counter() - begin)
    timed = seconds[args.warmup:]
    out = {"variant": name, "losses": losses, "step_seconds": seconds, "wall_seconds": time.perf_counter() - started,
           "step_seconds_median": statistics.median(timed),
           "float8_layers": sum(type(m).__name__ == "Float8Linear" for m in model.modules())}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on CPU, no compile")
    p.add_argument("--preset", default=None, help="default: mpt-1b on CUDA, mpt-tiny on CPU")
    p.add_argument("--layers", type=int, default=0, help="keep the preset's width, use N layers")
    p.add_argument("--seq", type=int, default=None, help="default: 2048 on CUDA, 64 on CPU")
    p.add_argument("--micro-batch", type=int, default=None, help="default: 8 on CUDA, 2 on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per variant (default: 24 on CUDA, 6 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 6 on CUDA, 2 on CPU)")
    p.add_argument("--batches", type=int, default=4, help="distinct random batches, cycled")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--time-budget-s", type=float, default=75.0,
                   help="skip a variant when the ones before it leave too little of this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    started = time.monotonic()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    on_gpu = device.type == "cuda"
    args.compile = on_gpu
    args.preset = args.preset or ("mpt-1b" if on_gpu else "mpt-tiny")
    args.seq = args.seq or (2048 if on_gpu else 64)
    args.micro_batch = args.micro_batch or (8 if on_gpu else 2)
    args.steps = args.steps or (24 if on_gpu else 6)
    args.warmup = args.warmup if args.warmup is not None else (6 if on_gpu else 2)
    layers = args.layers or (0 if on_gpu else 2)
    cfg = MPTConfig.from_preset(args.preset, max_seq_len=args.seq, **({"n_layers": layers} if layers else {}))

    if on_gpu and torch.cuda.get_device_capability(device) < (8, 9):
        reason = (f"needs compute capability 8.9+ for float8 matmuls ({torch.cuda.get_device_name(device)} is "
                  f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})")
        return _finish(args, {"skipped": reason})
    from mptlike.parallel.float8 import torchao_problem

    problem = torchao_problem()
    if problem:
        return _finish(args, {"skipped": f"{problem} (pip install 'mptlike[float8]', or carry its wheel: "
                                         f"benchmarks/gpu_wheels.sh)"})

    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = torch.randint(0, cfg.vocab_size, (args.batches, args.micro_batch, args.seq + 1),
                            generator=generator).to(device)
    with torch.device("meta"):
        flops_per_token = MPTForCausalLM(cfg).flops_per_token(args.seq)
    peak = peak_flops(0.0, device)
    rows, skipped = [], []
    for name in args.variants:
        spent = time.monotonic() - started
        if rows and spent + 1.2 * max(r["wall_seconds"] for r in rows) > args.time_budget_s:
            skipped.append(f"{name}: not run, {spent:.0f} s of the {args.time_budget_s:.0f} s budget spent")
            continue
        row = run_variant(name, cfg, batches, args, device)
        row["tokens_per_sec"] = args.micro_batch * args.seq / row["step_seconds_median"]
        row["tflops"] = row["tokens_per_sec"] * flops_per_token / 1e12
        row["mfu_vs_bf16_peak"] = row["tflops"] * 1e12 / peak if peak else None
        rows.append(row)
        print(f"{name:<10} {row['tokens_per_sec']:>10,.0f} tokens/s  {row['tflops']:7.1f} TFLOP/s  "
              f"step {row['step_seconds_median'] * 1e3:7.1f} ms  losses {row['losses'][0]:.3f} -> "
              f"{row['losses'][-1]:.3f}  ({row['wall_seconds']:.0f} s)", flush=True)
    base = next((r for r in rows if r["variant"] == "bf16"), None)
    for row in rows:
        if base is not None and row is not base:
            row["speedup_vs_bf16"] = row["tokens_per_sec"] / base["tokens_per_sec"]
            row["max_rel_loss_diff_vs_bf16"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], base["losses"]))
    payload = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "torch": torch.__version__,
        "torchao": _torchao_version(),
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/float8_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "seq": args.seq,
        "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup, "compile": args.compile,
        "lr": args.lr, "flops_per_token": flops_per_token, "flops_formula": FLOPS_FORMULA, "peak_flops": peak,
        "rows": rows, "skipped_variants": skipped,
    }
    return _finish(args, payload)


def _torchao_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _finish(args: argparse.Namespace, payload: dict) -> int:
    if "skipped" in payload:
        print(f"float8 check skipped: {payload['skipped']}")
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
