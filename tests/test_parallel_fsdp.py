"""FSDP2 on 2 CPU processes (gloo) against one process: same losses, checkpoints that either world size resumes."""

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mptlike.data.prep import prepare
from mptlike.train.cli import main

REL = 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    files = sorted(Path(json.__file__).parent.glob("*.py"))
    prepare(files, out, "bytes", val_inputs=[textwrap.__file__], progress=False)
    return out


def tiny_args(corpus, run_dir, *extra):
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
        # Blocks 0 and 2, ... recompute activations: exercised here under FSDP2.
        "parallel.activation_checkpointing=every_k",
        "parallel.ac_every=2",
        f"run_dir={run_dir}",
        *extra,
    ]


def losses(run_dir, key="train/loss"):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "mptlike.train", *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def assert_close(got, want):
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=REL), (step, got[step], want[step])


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    assert main(tiny_args(corpus, run_dir)) == 0
    return run_dir


@pytest.fixture(scope="module")
def two_processes(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two") / "run"
    torchrun(tiny_args(corpus, run_dir))
    return run_dir


@pytest.mark.slow
def test_two_process_fsdp2_gives_the_same_losses_as_one_process(one_process, two_processes):
    assert_close(losses(two_processes), losses(one_process))
    assert_close(losses(two_processes, "val/loss"), losses(one_process, "val/loss"))


@pytest.mark.slow
def test_two_process_fsdp2_gradients_are_the_mean_over_ranks(one_process, two_processes):
    # Adam hides a gradient scale in the losses; the pre-clipping norm shows it.
    assert_close(losses(two_processes, "train/grad_norm"), losses(one_process, "train/grad_norm"))


@pytest.mark.slow
def test_two_process_checkpoint_is_sharded_into_one_file_per_rank(two_processes):
    ckpt = two_processes / "checkpoints" / "step-0000003"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert json.loads((ckpt / "train_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_one_process_resumes_a_two_process_checkpoint(corpus, one_process, two_processes, tmp_path):
    run_dir = tmp_path / "resumed-on-1"
    assert main(tiny_args(corpus, run_dir, f"resume={two_processes / 'checkpoints' / 'step-0000003'}")) == 0
    want = {s: v for s, v in losses(one_process).items() if s > 3}
    assert_close(losses(run_dir), want)


@pytest.mark.slow
def test_two_processes_resume_a_one_process_checkpoint(corpus, one_process, tmp_path):
    run_dir = tmp_path / "resumed-on-2"
    torchrun(tiny_args(corpus, run_dir, f"resume={one_process / 'checkpoints' / 'step-0000003'}"))
    want = {s: v for s, v in losses(one_process).items() if s > 3}
    assert_close(losses(run_dir), want)
