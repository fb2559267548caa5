"""End-to-end training-step throughput: tokens/s, TFLOP/s, MFU and peak memory for one device.

One step is what training does: forward with the fused loss, backward, AdamW (fused on CUDA,
foreach on CPU), on a fixed random batch, under bf16 autocast on GPU (fp32 on CPU by default).
Activation checkpointing and per-block torch.compile come from ``mptlike.parallel`` when it is
importable; otherwise the step runs plain and the output says so.

    python benchmarks/throughput.py --preset mpt-1b --seq 2048 --micro-batch 8 --steps 20
    python benchmarks/throughput.py --preset mpt-7b --layers 4 --seq 2048 --micro-batch 4   # 7B-width slice
    python benchmarks/throughput.py --preset mpt-tiny --seq 256 --micro-batch 8 --steps 10 --compare-hf

FLOPs per token are ``MPTForCausalLM.flops_per_token``: 6 * N + 12 * n_layers * d_model * seq (N = all
parameters, attention counted causal-unaware), the same numbers the trainer logs. MFU is reported
against the datasheet peak (H100/H200 989e12, A100 312e12, or ``--peak-flops``) and against a matmul
ceiling measured at start.

``--compare-hf`` (CPU) times the same step side by side with transformers' ``MptForCausalLM``: same
config, same weights (copied by state dict), same batch, same threads, fp32, same optimizer. The
two steps alternate in one process, so load from other processes hits both alike; peak memory is
the RSS growth (``resource.getrusage``) of each side alone in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

try:
    import mptlike  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mptlike.errors import EXIT_USAGE, MptlikeError
from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.train.flops import FLOPS_FORMULA, peak_flops  # torch only, like the model

log = logging.getLogger("throughput")



# ---------------------------------------------------------------------------------------------
# measurements


@dataclass
class StepStats:
    step_seconds: list[float]
    losses: list[float]
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time per step, all threads
    peak_memory_bytes: int | None = None  # CUDA: max allocated; CPU: peak RSS growth of this process
    peak_reserved_bytes: int | None = None

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds)


@dataclass
class Report:
    preset: str
    config: dict[str, Any]
    device: str
    device_name: str
    torch_version: str
    date: str
    command: str
    threads: int
    precision: str
    optimizer: str
    micro_batch: int
    seq: int
    num_params: int
    flops_per_token: int
    flops_formula: str
    parallel: str
    matmul_ceiling_flops: float
    peak_flops: float | None
    step_seconds_median: float
    step_seconds_all: list[float]
    tokens_per_sec: float
    tflops: float
    mfu_vs_peak: float | None
    mfu_vs_matmul_ceiling: float
    peak_memory_gib: float | None
    peak_reserved_gib: float | None
    loss_first: float
    loss_last: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Best achieved FLOP/s of a large square matmul: the practical ceiling for this device and dtype.

    The fastest repetition, not the median: interference only ever slows a run down, and a ceiling
    that a training step can beat is no ceiling.
    """
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 10
    for _ in range(3):
        a @ b
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def time_steps(
    step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int, rss_baseline: int | None = None
) -> StepStats:
    """Run ``warmup`` untimed then ``steps`` timed training steps; peak memory covers all of them."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    for _ in range(warmup):
        losses.append(float(step()))
    times, cpu_times = [], []
    for _ in range(steps):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(float(loss))
    stats = StepStats(step_seconds=times, losses=losses, cpu_seconds=cpu_times)
    if device.type == "cuda":
        stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
        stats.peak_reserved_bytes = torch.cuda.max_memory_reserved(device)
    elif rss_baseline is not None:
        stats.peak_memory_bytes = peak_rss_bytes() - rss_baseline
    return stats


# ---------------------------------------------------------------------------------------------
# the training step


def build_config(args: argparse.Namespace) -> MPTConfig:
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise MptlikeError(f"--set {item!r} is not KEY=VALUE: write e.g. --set kv_n_heads=4")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    if args.layers:
        overrides["n_layers"] = args.layers
    if args.attn_impl:
        overrides["attn_impl"] = args.attn_impl
    cfg = MPTConfig.from_preset(args.preset, **overrides)
    if args.seq > cfg.max_seq_len:
        cfg = MPTConfig.from_dict({**cfg.to_dict(), "max_seq_len": args.seq})
    return cfg


def make_batch(vocab_size: int, micro_batch: int, seq: int, seed: int) -> torch.Tensor:
    """``micro_batch`` rows of ``seq + 1`` random tokens: inputs are [:-1], targets [1:]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (micro_batch, seq + 1), generator=gen)


def make_optimizer(params, device: torch.device, impl: str = "auto") -> torch.optim.Optimizer:
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    impl = {impl: True}
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, **impl)


def apply_parallel(model: torch.nn.Module, ac: str, ac_every: int, compile_blocks: bool) -> str:
    """AC and per-block compile through mptlike.parallel; a description of what was applied."""
    wanted = ac != "none" or compile_blocks
    try:
        from mptlike.parallel import ParallelPlan, parallelize
    except ImportError as exc:
        if wanted:
            log.warning("mptlike.parallel is unavailable (%s); running without --ac/--compile", exc)
        return f"none (mptlike.parallel unavailable: {exc})"
    try:
        parallelize(model, ParallelPlan(ac_mode=ac, ac_every=ac_every, compile=compile_blocks))
    except (TypeError, AttributeError) as exc:
        log.warning("mptlike.parallel.parallelize does not fit this benchmark (%s); running plain", exc)
        return f"none (mptlike.parallel incompatible: {exc})"
    every = f"(every {ac_every})" if ac == "every_k" else ""
    return f"mptlike.parallel: ac={ac}{every}, compile={compile_blocks}"


def ours_step(model, optimizer, tokens: torch.Tensor, autocast: contextlib.AbstractContextManager | None):
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast or contextlib.nullcontext():
            loss = model(inputs, labels=targets).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def hf_step(model, optimizer, tokens: torch.Tensor):
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        # shift_labels: the same targets at the same positions as ours (no position dropped).
        loss = model(inputs, labels=inputs, shift_labels=targets).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def hf_config(cfg: MPTConfig):
    """transformers' MptConfig for the same network; the exporter's mapping and its feature check."""
    import transformers

    from mptlike.integrations.hf import to_hf_config

    try:
        values = to_hf_config(cfg)
    except MptlikeError as exc:
        raise MptlikeError(f"--compare-hf needs a config transformers' MPT supports ({exc})") from exc
    return transformers.MptConfig(**{k: v for k, v in values.items() if k not in ("architectures", "model_type")})


# ---------------------------------------------------------------------------------------------
# modes


def run_single(args: argparse.Namespace, command: str) -> Report:
    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cfg = build_config(args)
    ceiling = measure_matmul_ceiling(device, dtype)
    peak = peak_flops(args.peak_flops or 0.0, device)

    rss_baseline = peak_rss_bytes()
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = MPTForCausalLM(cfg)
    model.train()
    parallel = apply_parallel(model, args.ac, args.ac_every, args.compile)
    optimizer = make_optimizer(model.parameters(), device, args.adamw)
    tokens = make_batch(cfg.vocab_size, args.micro_batch, args.seq, args.seed + 1).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    stats = time_steps(ours_step(model, optimizer, tokens, autocast), device, args.warmup, args.steps, rss_baseline)

    flops_per_token = model.flops_per_token(args.seq)
    tokens_per_sec = args.micro_batch * args.seq / stats.median_step
    achieved = tokens_per_sec * flops_per_token
    gib = 1024**3
    return Report(
        preset=args.preset,
        config={k: cfg.to_dict()[k]
                for k in ("d_model", "n_heads", "kv_n_heads", "n_layers", "vocab_size", "attn_impl")},
        device=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        torch_version=torch.__version__,
        date=datetime.date.today().isoformat(),
        command=command,
        threads=torch.get_num_threads(),
        precision=precision,
        optimizer=type(optimizer).__name__ + "(" + ("fused" if optimizer.defaults.get("fused") else "foreach") + ")",
        micro_batch=args.micro_batch,
        seq=args.seq,
        num_params=model.num_params(),
        flops_per_token=flops_per_token,
        flops_formula=FLOPS_FORMULA,
        parallel=parallel,
        matmul_ceiling_flops=ceiling,
        peak_flops=peak,
        step_seconds_median=stats.median_step,
        step_seconds_all=stats.step_seconds,
        tokens_per_sec=tokens_per_sec,
        tflops=achieved / 1e12,
        mfu_vs_peak=achieved / peak if peak else None,
        mfu_vs_matmul_ceiling=achieved / ceiling,
        peak_memory_gib=stats.peak_memory_bytes / gib if stats.peak_memory_bytes is not None else None,
        peak_reserved_gib=stats.peak_reserved_bytes / gib if stats.peak_reserved_bytes is not None else None,
        loss_first=stats.losses[0],
        loss_last=stats.losses[-1],
    )


def build_side(side: str, cfg: MPTConfig, state: dict[str, torch.Tensor], tokens: torch.Tensor, adamw: str):
    """One side of --compare-hf: the model holding ``state`` (built on meta, so no random init is
    paid for and then overwritten) and its training step."""
    if side == "ours":
        with torch.device("meta"):
            model = MPTForCausalLM(cfg)
        model.load_state_dict(state, assign=True)
    else:
        import transformers

        with torch.device("meta"):
            model = transformers.MptForCausalLM(hf_config(cfg))
        model.load_state_dict(state, strict=False, assign=True)  # lm_head is tied to wte
        model.tie_weights()
    model.train()
    optimizer = make_optimizer(model.parameters(), torch.device("cpu"), adamw)
    return ours_step(model, optimizer, tokens, None) if side == "ours" else hf_step(model, optimizer, tokens)


def load_shared(path: str) -> tuple[MPTConfig, torch.Tensor, dict[str, torch.Tensor]]:
    shared = torch.load(path, weights_only=True)
    # Fresh tensors per side: load_state_dict(assign=True) makes them the parameters.
    state = {k: v.clone() for k, v in shared["state"].items()}
    return MPTConfig.from_dict(json.loads(shared["config"])), shared["tokens"], state


def run_worker(args: argparse.Namespace) -> None:
    """Peak memory of one side of --compare-hf, alone in a fresh process; writes StepStats as JSON."""
    torch.set_num_threads(args.threads)
    if args.worker == "hf":
        import transformers  # noqa: F401  (imported before the baseline: its import is not the model's memory)
    # Peak RSS so far = the interpreter with torch (and transformers) imported; everything after it,
    # weights included, is this side's.
    rss_baseline = peak_rss_bytes()
    cfg, tokens, state = load_shared(args.worker_state)
    step = build_side(args.worker, cfg, state, tokens, args.adamw)
    del state
    stats = time_steps(step, torch.device("cpu"), args.warmup, args.steps, rss_baseline)
    Path(args.worker_out).write_text(json.dumps(asdict(stats)))


def time_interleaved(steps: dict[str, Callable[[], torch.Tensor]], warmup: int, n: int) -> dict[str, StepStats]:
    """Alternate the sides step by step, so that load from other processes hits both alike."""
    stats = {side: StepStats(step_seconds=[], losses=[]) for side in steps}
    for i in range(warmup + n):
        for side, step in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = float(step())
            if i >= warmup:
                stats[side].step_seconds.append(time.perf_counter() - start)
                stats[side].cpu_seconds.append(time.process_time() - cpu_start)
            stats[side].losses.append(loss)
    return stats


def run_compare_hf(args: argparse.Namespace, command: str) -> dict[str, Any]:
    cfg = build_config(args)
    hf_config(cfg)  # fail early, in the parent, on configs transformers cannot express
    threads = args.threads or torch.get_num_threads()
    torch.manual_seed(args.seed)
    model = MPTForCausalLM(cfg)
    tokens = make_batch(cfg.vocab_size, args.micro_batch, args.seq, args.seed + 1)
    memory: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / "shared.pt"
        torch.save({"config": json.dumps(cfg.to_dict()), "tokens": tokens, "state": model.state_dict()}, shared)
        del model
        # Memory: each side alone in a fresh process (two steps reach the peak: the optimizer state
        # exists from the first one). Time: both sides in this process, step by step.
        for side in ("ours", "hf"):
            out = Path(tmp) / f"{side}.json"
            cmd = [
                sys.executable, str(Path(__file__).resolve()),
                "--worker", side, "--worker-state", str(shared), "--worker-out", str(out),
                "--threads", str(threads), "--warmup", "1", "--steps", "1", "--adamw", args.adamw,
            ]  # fmt: skip
            subprocess.run(cmd, check=True)
            memory[side] = json.loads(out.read_text())
        steps = {}
        for side in ("ours", "hf"):
            cfg_, tokens_, state = load_shared(str(shared))
            steps[side] = build_side(side, cfg_, state, tokens_, args.adamw)
    timed = time_interleaved(steps, args.warmup, args.steps)

    tokens_per_step = args.micro_batch * args.seq
    summary: dict[str, Any] = {
        "device_name": cpu_name(),
        "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "threads": threads,
        "precision": "fp32",
        "adamw": args.adamw,
        "config": {k: cfg.to_dict()[k] for k in ("d_model", "n_heads", "n_layers", "vocab_size", "attn_impl")},
        "micro_batch": args.micro_batch,
        "seq": args.seq,
        "timed_steps": args.steps,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for side, stats in timed.items():
        median = stats.median_step
        summary[side] = {
            "step_seconds_median": median,
            "step_seconds_min": min(stats.step_seconds),
            # CPU seconds per step move less than wall time when other processes share the cores.
            "cpu_seconds_median": statistics.median(stats.cpu_seconds),
            "step_seconds_all": stats.step_seconds,
            "tokens_per_sec": tokens_per_step / median,
            "peak_rss_growth_mib": memory[side]["peak_memory_bytes"] / 2**20,
            "loss_first": stats.losses[0],
            "loss_last": stats.losses[-1],
        }
    summary["ratio_ours_over_hf"] = {
        "step_time": summary["ours"]["step_seconds_median"] / summary["hf"]["step_seconds_median"],
        "step_time_min": summary["ours"]["step_seconds_min"] / summary["hf"]["step_seconds_min"],
        "cpu_time": summary["ours"]["cpu_seconds_median"] / summary["hf"]["cpu_seconds_median"],
        "peak_memory": summary["ours"]["peak_rss_growth_mib"] / summary["hf"]["peak_rss_growth_mib"],
    }
    summary["speedup_ours_vs_hf"] = 1 / summary["ratio_ours_over_hf"]["step_time"]
    return summary


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------------------------------------
# output


def print_report(report: Report) -> None:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    mem = "n/a" if report.peak_memory_gib is None else f"{report.peak_memory_gib:.2f} GiB"
    if report.device == "cpu" and report.peak_memory_gib is not None:
        mem += " (peak RSS growth)"
    print(f"{report.preset} ({report.config}) on {report.device_name}, torch {report.torch_version}")
    print(f"  {report.precision}, {report.optimizer}, micro-batch {report.micro_batch} x seq {report.seq}, "
          f"{report.threads} threads; "
          f"{report.num_params / 1e6:.1f}M params; parallel: {report.parallel}")
    print(f"  step {report.step_seconds_median * 1e3:.1f} ms (median of {len(report.step_seconds_all)}), "
          f"{report.tokens_per_sec:,.0f} tokens/s/device, {report.tflops:.2f} TFLOP/s")
    print(f"  MFU {pct(report.mfu_vs_peak)} of peak "
          f"{'n/a' if report.peak_flops is None else f'{report.peak_flops / 1e12:.0f} TFLOP/s'}, "
          f"{pct(report.mfu_vs_matmul_ceiling)} of the measured matmul ceiling "
          f"{report.matmul_ceiling_flops / 1e12:.3f} TFLOP/s")
    print(f"  peak memory {mem}; loss {report.loss_first:.4f} -> {report.loss_last:.4f}")
    print(f"  FLOPs/token = {report.flops_per_token:,} = {report.flops_formula}")


def print_compare(summary: dict[str, Any]) -> None:
    print(f"ours vs transformers MptForCausalLM on {summary['device_name']}, {summary['threads']} threads, fp32, "
          f"torch {summary['torch_version']}, transformers {summary['transformers_version']}")
    print(f"  config {summary['config']}, micro-batch {summary['micro_batch']} x seq {summary['seq']}")
    print(f"  {'':6} {'step ms':>10} {'min ms':>10} {'CPU ms':>10} {'tokens/s':>10} {'peak RSS +MiB':>14} "
          f"{'loss first':>11}")
    for side in ("ours", "hf"):
        s = summary[side]
        print(f"  {side:6} {s['step_seconds_median'] * 1e3:10.1f} {s['step_seconds_min'] * 1e3:10.1f} "
              f"{s['cpu_seconds_median'] * 1e3:10.1f} {s['tokens_per_sec']:10,.0f} {s['peak_rss_growth_mib']:14.1f} "
              f"{s['loss_first']:11.4f}")
    r = summary["ratio_ours_over_hf"]
    print(f"  ours/hf: step time {r['step_time']:.3f} (min {r['step_time_min']:.3f}, CPU time {r['cpu_time']:.3f}; "
          f"speed-up {summary['speedup_ours_vs_hf']:.2f}x), peak memory {r['peak_memory']:.3f}")


def write_json(path: str, payload: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, target)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mpt-tiny")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--layers", type=int, default=0, help="layer slice: keep the preset's width, use N layers")
    p.add_argument("--attn-impl", default=None, help="override model.attn_impl (torch | sdpa | flex | flash | triton)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other MPTConfig override (JSON value)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile every block (mptlike.parallel)")
    p.add_argument("--ac", choices=("none", "full", "every_k"), default="none", help="activation checkpointing")
    p.add_argument("--ac-every", type=int, default=2)
    p.add_argument("--adamw", choices=("auto", "fused", "foreach"), default="auto",
                   help="AdamW implementation (auto: fused on CUDA, foreach on CPU); both sides of --compare-hf use it")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="datasheet peak FLOP/s for MFU (auto on H100/H200/A100)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-hf", action="store_true", help="CPU: time the same step against transformers' MPT")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--worker-state", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.warmup is None:
        args.warmup = 3 if args.device.startswith("cuda") else 1
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.worker:
            run_worker(args)
            return 0
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.compare_hf:
            summary = run_compare_hf(args, command)
            print_compare(summary)
            payload: dict[str, Any] = summary
        else:
            report = run_single(args, command)
            print_report(report)
            payload = asdict(report)
        if args.out:
            write_json(args.out, payload)
    except MptlikeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
