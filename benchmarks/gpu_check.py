"""One prepared GPU check: everything a lent GPU should tell us, in at most 9 minutes, in one command.

    make gpu-check                                   # writes under $OUT (else runs/gpu-check)
    python benchmarks/gpu_check.py --out DIR         # the same
    python benchmarks/gpu_check.py --cpu --out DIR   # tiny shapes on CPU, CUDA-only stages skipped
    python benchmarks/gpu_check.py --only matmul throughput_mpt1b   # rerun some stages
    python benchmarks/gpu_check.py --only env float8                # float8 against bf16 (not in the default run)

Stages, each in its own process with its own time limit (a hang or a crash costs that stage only;
the limits add up to the budget, 9 minutes less 10 s, and a stage never gets more than the time left):

    env                 GPU, driver, CUDA, torch, triton, flash-attn, Python, the commit
    matmul              bf16 matmul ceiling (8192^3, best of 20), next to the datasheet peak
    attention_check     every backend against the fp32 reference in bf16 (benchmarks/attention_check.py)
    attention_<impl>    triton, flex, sdpa (ALiBi bias tensor), flash: seq 2048 and 8192, head dim 128,
                        forward+backward (benchmarks/attention.py)
    throughput_mpt1b    mpt-1b, seq 2048, micro-batch 8, compiled blocks (benchmarks/throughput.py)
    throughput_7b_slice mpt-7b's width with 4 layers, the same settings
    gpu_tests           pytest -m gpu over the test files that hold GPU tests, but the training ones
    gpu_train_tests     pytest -m gpu over tests/test_train_gpu.py (compiled bf16 training runs)
    memory              the memory estimate against max_memory_allocated (benchmarks/memory_check.py)

One more stage runs only when named with --only, since the ones above fill the budget:

    float8              mpt-1b trained with float8 (torchao, tensorwise and rowwise) against bf16: tokens/s, MFU
                        and a 24-step loss curve each (benchmarks/float8_check.py); needs sm89+ and torchao,
                        carried in .whl/ (benchmarks/gpu_wheels.sh)

Out: summary.md (tables ready to paste into benchmarks/RESULTS.md, with the GPU, torch version,
date and command), gpu_check.json (every stage's status, time and numbers) and gpu_check.log
(every stage's output). Three files: the device tool brings back at most eight. Exit code 0 when
every stage that ran passed (skipped stages are listed, not failures), else 1.

On a machine without hydra-core (the GPU machine), the GPU tests that train need wheels carried in
.whl/ (benchmarks/gpu_wheels.sh fetches them); gpu_check installs them into a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from gpu_check_report import write_summary

HERE = str(Path(__file__).resolve())
ROOT = Path(HERE).parents[1]
BENCH = ROOT / "benchmarks"
# 9 minutes less 10 s for this process to start and write its files: the device tool allows 10 minutes a
# command and 15 a session, the machine's start included. The stages' limits add up to this.
BUDGET_S = 530
DATASHEET_PEAK = 989e12  # H100/H200 SXM dense bf16 (mptlike.train.flops)
TARGETS = {"mfu_mpt1b": 0.55, "mfu_7b_slice": 0.55, "triton_vs_flex": 1.0, "triton_vs_sdpa": 2.0}


@dataclass(frozen=True)
class Stage:
    name: str
    timeout_s: int
    command: Callable[[bool, Path], list[str] | str]  # (on_gpu, json_path) -> argv, or a reason to skip


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    timeout_s: float = 0.0
    command: str = ""
    reason: str = ""
    data: dict | None = None


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _attention(impl: str) -> Callable[[bool, Path], list[str] | str]:
    def command(on_gpu: bool, out: Path) -> list[str] | str:
        if impl == "flash" and not on_gpu:
            return "needs CUDA (flash-attn has no CPU kernels)"
        if impl == "triton" and not on_gpu:
            return "needs CUDA to mean anything (interpreted on CPU, it is checked by attention_check instead)"
        if impl == "flash" and importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed (pip install 'mptlike[flash]')"
        shapes = (["--seqs", "2048", "8192", "--head-dims", "128"] if on_gpu else
                  ["--cpu", "--seqs", "64", "--head-dims", "16", "--batch-tokens", "128", "--d-model", "64",
                   "--repeats", "2"])
        return _py(str(BENCH / "attention.py"), "--impls", impl, *shapes, "--gqa-ratio", "1", "--out", str(out))

    return command


def _throughput(preset: str, layers: int) -> Callable[[bool, Path], list[str]]:
    def command(on_gpu: bool, out: Path) -> list[str]:
        if on_gpu:
            args = ["--preset", preset, "--seq", "2048", "--micro-batch", "8", "--steps", "10", "--warmup", "3",
                    "--compile"]
            args += ["--layers", str(layers)] if layers else []
        else:
            args = ["--preset", "mpt-tiny", "--layers", "2", "--seq", "64", "--micro-batch", "2", "--steps", "1",
                    "--warmup", "1"]
        return _py(str(BENCH / "throughput.py"), *args, "--out", str(out))

    return command


TRAINING_TESTS = "tests/test_train_gpu.py"  # training runs compile: a stage of their own, so a slow compile
# cannot take the kernel tests' report (pytest prints tracebacks only when it ends) down with it


def _gpu_tests(training: bool) -> Callable[[bool, Path], list[str] | str]:
    def command(on_gpu: bool, out: Path) -> list[str] | str:
        if not on_gpu:
            return "needs CUDA (every GPU test skips without one)"
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text() and (str(p.relative_to(ROOT)) == TRAINING_TESTS) == training)
        # -v: one line per test as it ends, so a timeout still shows which test was running and how far it got.
        return _py("-m", "pytest", "-m", "gpu", "-v", "-rfEs", "--tb=short", "--durations=10", "-p",
                   "no:cacheprovider", "--continue-on-collection-errors", f"--junitxml={out.with_suffix('.xml')}",
                   *files)

    return command


# Limits from the first runs on an H200 (env 4 s, matmul 5, sdpa 8, triton 46, flex 36, each throughput 24,
# memory 11): the attention check and the GPU tests spend most of theirs compiling triton's autotune
# candidates and flex kernels (about 10 s and 13 s per shape family).
STAGES = [
    Stage("env", 10, lambda gpu, out: _py(HERE, "--stage", "env", "--stage-out", str(out))),
    Stage("matmul", 15, lambda gpu, out: _py(HERE, "--stage", "matmul", "--stage-out", str(out))),
    Stage("attention_check", 120,
          lambda gpu, out: _py(str(BENCH / "attention_check.py"), *([] if gpu else ["--cpu"]), "--out", str(out))),
    Stage("attention_triton", 50, _attention("triton")),
    Stage("attention_flex", 45, _attention("flex")),
    Stage("attention_sdpa", 15, _attention("sdpa")),
    Stage("attention_flash", 15, _attention("flash")),
    Stage("throughput_mpt1b", 45, _throughput("mpt-1b", 0)),
    Stage("throughput_7b_slice", 40, _throughput("mpt-7b", 4)),
    Stage("gpu_tests", 80, _gpu_tests(training=False)),
    Stage("gpu_train_tests", 60, _gpu_tests(training=True)),
    Stage("memory", 35, lambda gpu, out: _py(str(BENCH / "memory_check.py"), *([] if gpu else ["--cpu"]),
                                             "--out", str(out))),
]


def _float8(on_gpu: bool, out: Path) -> list[str] | str:
    if not on_gpu:
        return "needs CUDA (float8 matmuls need compute capability 8.9+; benchmarks/float8_check.py --cpu runs tiny)"
    # The script itself skips, with the reason in its JSON, below sm89 or without torchao.
    return _py(str(BENCH / "float8_check.py"), "--time-budget-s", "75", "--out", str(out))


# Stages outside the budget above (it is full): run only when --only names them.
OPT_IN_STAGES = [
    Stage("float8", 90, _float8),
]


# ---------------------------------------------------------------------------------------------
# the two stages that live here


def stage_env() -> dict:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": version("triton"),
        "flash_attn": version("flash-attn"),
        "hydra_core": version("hydra-core"),
        "commit": _git_commit(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        smi = shutil.which("nvidia-smi")
        if smi:
            done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10)
            info["driver"] = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else "unknown"
    else:
        info.update(gpu="none (CPU mode)", driver="n/a", cpu=platform.processor() or platform.machine(),
                    threads=torch.get_num_threads())
    return info


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def stage_matmul() -> dict:
    from throughput import measure_matmul_ceiling  # benchmarks/throughput.py, beside this file; imports mptlike

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    ceiling = measure_matmul_ceiling(device, dtype)
    return {"dtype": str(dtype).removeprefix("torch."), "n": 8192 if on_gpu else 1024, "flops": ceiling,
            "tflops": ceiling / 1e12, "datasheet_peak_tflops": DATASHEET_PEAK / 1e12 if on_gpu else None}


# ---------------------------------------------------------------------------------------------
# running the stages


def carried_wheels(env: dict[str, str], work: Path) -> str:
    """Install .whl/*.whl into `work` and put it on PYTHONPATH when hydra is missing; a note for the log."""
    if importlib.util.find_spec("hydra") is not None:
        return ""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return "hydra-core is missing and no wheels are in .whl/: the GPU tests that train will error"
    target = work / "site"
    done = subprocess.run(_py("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                              str(target), *map(str, wheels)), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return f"installing .whl/ failed: {done.stderr.strip()[-300:]}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH", "")]))
    return f"installed {len(wheels)} carried wheels from .whl/ into {target}"


def run_stage(stage: Stage, on_gpu: bool, work: Path, env: dict[str, str], seconds_left: float, log) -> StageResult:
    out = work / f"{stage.name}.json"
    command = stage.command(on_gpu, out)
    if isinstance(command, str):
        log.write(f"\n=== {stage.name}: skipped: {command}\n")
        return StageResult(stage.name, "skipped", reason=command)
    limit = min(stage.timeout_s, seconds_left)
    shown = " ".join(Path(a).name if a == sys.executable else os.path.relpath(a, ROOT) if a.startswith(str(ROOT))
                     else a for a in command)
    if seconds_left < 2:
        log.write(f"\n=== {stage.name}: skipped: the 9-minute budget is spent\n")
        return StageResult(stage.name, "skipped", command=shown, reason="no time left in the budget")
    log.write(f"\n=== {stage.name} (limit {limit:.0f} s): {shown}\n")
    log.flush()
    started = time.monotonic()
    # A session of its own, so that a timeout also ends what the stage started (compile workers, pytest's
    # children) and the next stage gets the GPU to itself.
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
        status, reason = ("ok", "") if code == 0 else ("failed", f"exit code {code}")
    except subprocess.TimeoutExpired:
        status, reason = "timeout", f"stopped after {limit:.0f} s"
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage on timeout; anything it left running otherwise
    except ProcessLookupError:
        pass
    proc.wait()
    seconds = time.monotonic() - started
    data = json.loads(out.read_text()) if out.is_file() else None
    if data is None and out.with_suffix(".xml").is_file():
        data = _junit_counts(out.with_suffix(".xml"))
    log.write(f"=== {stage.name}: {status} in {seconds:.1f} s {reason}\n")
    log.flush()
    return StageResult(stage.name, status, seconds, limit, shown, reason, data)


def _junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None][:20]
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU; stages that need CUDA are skipped")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in [*STAGES, *OPT_IN_STAGES]],
                        help="run only these stages (the only way to run float8)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-time budget for all stages")
    parser.add_argument("--stage", choices=["env", "matmul"], help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        result = stage_env() if args.stage == "env" else stage_matmul()
        print(json.dumps(result, indent=2))
        args.stage_out.write_text(json.dumps(result, indent=2) + "\n")
        return 0

    on_gpu = torch.cuda.is_available() and not args.cpu
    out_dir = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "make gpu-check" if os.environ.get("MAKELEVEL") else "python benchmarks/gpu_check.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    # Triton's autotuner says in the log which block sizes won and how long each tuning took.
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_PRINT_AUTOTUNING="1")
    if not on_gpu:
        env["TRITON_INTERPRET"] = "1"  # the triton kernels run interpreted on CPU
        env["CUDA_VISIBLE_DEVICES"] = ""  # --cpu on a GPU box: the stages must not see it either
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, open(out_dir / "gpu_check.log", "w") as log:
        note = carried_wheels(env, Path(tmp)) if on_gpu else ""
        if note:
            log.write(note + "\n")
        for stage in [*STAGES, *OPT_IN_STAGES]:
            if stage.name not in (args.only or [s.name for s in STAGES]):
                continue
            left = args.budget_s - (time.monotonic() - started)
            results.append(run_stage(stage, on_gpu, Path(tmp), env, left, log))
            print(f"{stage.name:<20} {results[-1].status:<8} {results[-1].seconds:6.1f} s  {results[-1].reason}",
                  flush=True)
    total = time.monotonic() - started
    payload = {"mode": "gpu" if on_gpu else "cpu", "command": command, "total_seconds": total,
               "budget_seconds": args.budget_s, "targets": TARGETS, "stages": [asdict(r) for r in results]}
    (out_dir / "gpu_check.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_summary(out_dir / "summary.md", payload)
    print(f"total {total:.0f} s; wrote {out_dir / 'summary.md'}, {out_dir / 'gpu_check.json'}, "
          f"{out_dir / 'gpu_check.log'}")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
