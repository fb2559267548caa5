"""Shared by the training tests: a tiny byte-level corpus, tiny-model overrides, metrics, torchrun."""

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from mptlike.data.prep import prepare


def make_corpus(out):
    """The json package's sources to train on, textwrap.py held out (byte tokenizer, vocab 256+)."""
    files = sorted(Path(json.__file__).parent.glob("*.py"))
    prepare(files, out, "bytes", val_inputs=[textwrap.__file__], progress=False)
    return out


def tiny_args(corpus, run_dir, *extra):
    """d_model 64, 2 layers, seq 32; 6 steps of 8 sequences, checkpoints after steps 3 and 6."""
    return [
        "trainer=cpu",
        "model.d_model=64",
        "model.n_heads=4",
        "model.n_layers=2",
        "model.max_seq_len=32",
        "model.vocab_size=320",
        "data=folder",
        f"data.path={corpus}",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=2",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "optim.weight_decay=1e-4",
        "eval.every_n_steps=3",
        "eval.max_samples=8",
        "checkpoint.every_n_steps=3",
        "checkpoint.keep_last=0",
        "checkpoint.export_final=false",
        "sample.max_new_tokens=0",
        "logger=csv",
        f"run_dir={run_dir}",
        *extra,
    ]


def sharded_args(corpus, run_dir, *extra):
    """tiny_args with activation checkpointing on blocks 0, 2, ...: how the FSDP2 / HSDP tests run."""
    return tiny_args(corpus, run_dir, "parallel.activation_checkpointing=every_k", "parallel.ac_every=2", *extra)


def assert_close_per_step(got, want, rel=1e-4):
    """Two {step: value} series over the same steps, equal within `rel`."""
    import pytest

    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rel), (step, got[step], want[step])


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return {int(row["step"]): row for row in csv.DictReader(f)}


def losses(run_dir, key="train/loss"):
    return {step: float(row[key]) for step, row in read_metrics(run_dir).items() if row.get(key)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(args, nproc=2):
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "mptlike.train", *args,
    ]


def torchrun_env(faults=""):
    """The environment of a test run; `faults` goes to MPTLIKE_FAULTS (mptlike.faults)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPTLIKE_FAULTS": faults}


def torchrun(args, nproc=2, timeout=300, faults=""):
    proc = subprocess.run(torchrun_cmd(args, nproc), capture_output=True, text=True, env=torchrun_env(faults),
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
