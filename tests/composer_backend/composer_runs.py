"""Helpers of the Composer tests: the small quickstart run, metrics.csv, Composer runs in this process or their own."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

SEQ_LEN = 32
MAX_STEPS = 6
WORDS = "the model trains on tokens with alibi attention and a cosine schedule over many steps".split()


def small_run(data_dir: Path, run_dir: Path, *extra: str, trainer: str = "trainer=cpu") -> list[str]:
    """Overrides of the quickstart: a 2-layer d_model=64 model, 6 steps of 8 sequences in micro-batches of 4."""
    return [
        f"run_dir={run_dir}",
        "data=folder",
        f"data.path={data_dir}",
        "model.vocab_size=257",
        "model.d_model=64",
        "model.n_heads=4",
        "model.n_layers=2",
        f"model.max_seq_len={SEQ_LEN}",
        trainer,
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "optim.warmup_steps=2",
        "optim.weight_decay=0.01",
        "checkpoint.every_n_steps=3",
        "eval.every_n_steps=0",
        "eval.max_samples=16",
        "sample.max_new_tokens=0",
        "logger=csv",
        *extra,
    ]


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.csv as {step: {name: value}} (empty cells left out)."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {int(r["step"]): {k: float(v) for k, v in r.items() if k != "step" and v != ""} for r in rows}


def train_with_composer(overrides: list[str]):
    """The Composer backend from a composed config, as `mptlike-train trainer=composer` runs it."""
    from mptlike.train.config import compose_config, to_train_config
    from mptlike.train.plan import build_plan
    from mptlike.train.run import run

    return run(build_plan(to_train_config(compose_config([*overrides, "trainer.backend=composer"]))))


def composer_process(overrides: list[str], *, nproc: int = 1, faults: str | None = None,
                     timeout: float = 240) -> subprocess.CompletedProcess:
    """`mptlike-train trainer.backend=composer` in processes of its own (torchrun for nproc > 1), one thread each.

    `faults` goes to MPTLIKE_FAULTS (mptlike.faults). Runs compared bit for bit must all
    run this way: the thread count changes the order of floating-point reductions.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MPTLIKE_FAULTS", None)
    if faults:
        env["MPTLIKE_FAULTS"] = faults
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "mptlike.train", *overrides, "trainer.backend=composer"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
