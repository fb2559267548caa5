"""kill -9 a 2-process run (at a random step, and in the middle of a checkpoint write), restart it
with resume=auto: the losses equal an uninterrupted run's step for step, and the data order shows
every global batch trained exactly once."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
from train_helpers import losses, make_corpus, tiny_args, torchrun, torchrun_cmd, torchrun_env

STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, run_dir, *extra):
    return tiny_args(corpus, run_dir, f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=2",
                     "checkpoint.keep_last=2", "eval.every_n_steps=0", "eval.at_end=false",
                     "debug.log_sample_ids=true", "resume=auto", *extra)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    torchrun(args(corpus, run_dir))
    return run_dir


def sample_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def process_tree(root):
    """root and every process below it (torchrun starts its workers in their own sessions)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def kill_tree(root):
    # Like a node dying: every process at once, no signal handler runs.
    for pid in process_tree(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_when(cmd_args, ready, timeout=240, faults=""):
    """Start a 2-process run, SIGKILL torchrun and its workers once ready() holds; return the output."""
    assert os.path.isdir("/proc"), "needs Linux /proc to find torchrun's workers"
    proc = subprocess.Popen(torchrun_cmd(cmd_args), env=torchrun_env(faults), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the kill:\n" + proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "timed out waiting for the kill point"
            time.sleep(0.02)
        kill_tree(proc.pid)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out[-4000:]
    return out


def assert_same_history(run_dir, reference):
    want, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Same ranks, same kernels, same reduction order on CPU: every bit matches.
    assert got == want
    rows, ref_rows = sample_rows(run_dir), sample_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "a step is missing or logged twice"
    assert rows == ref_rows
    seen = [i for r in rows for i in r["samples"]]
    assert sorted(seen) == sorted(i for r in ref_rows for i in r["samples"])


def _steps_logged(run_dir):
    path = run_dir / "samples.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_auto_matches_the_uninterrupted_run(corpus, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    kill_at = random.randint(3, STEPS // 2)
    kill_when(args(corpus, run_dir), lambda: _steps_logged(run_dir) >= kill_at)
    assert _steps_logged(run_dir) < STEPS, f"killed after step {kill_at} but the run had finished"
    torchrun(args(corpus, run_dir))
    assert_same_history(run_dir, uninterrupted)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_skips_the_partial_checkpoint(corpus, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed-saving"
    partial = run_dir / "checkpoints" / "step-0000004.tmp"
    # Every rank has written its shards and rank 0 the train state; the COMPLETE marker is not written yet.
    kill_when(args(corpus, run_dir), lambda: (partial / "train_state.json").is_file(), faults="checkpoint_delay_s=3")
    assert not (partial / "COMPLETE").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000002", "step-0000004.tmp"]
    proc = torchrun(args(corpus, run_dir))
    assert "resuming" in proc.stderr and "step-0000002" in proc.stderr
    assert_same_history(run_dir, uninterrupted)
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_two_ranks_agree_on_a_rollback_and_pass_over_the_same_batch(corpus, uninterrupted, tmp_path):
    run_dir = tmp_path / "rollback"
    torchrun(args(corpus, run_dir, "guard.nonfinite=rollback", "guard.max_skips=1"), faults="nan_at_step=5")
    want, got = losses(uninterrupted), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Step 5 ran once on the poisoned batch, rolled back to step 4, and was replayed on batch 6.
    assert [got[s] for s in range(1, 5)] == [want[s] for s in range(1, 5)]
    rows, ref_rows = sample_rows(run_dir), sample_rows(uninterrupted)
    assert rows[:4] == ref_rows[:4]
    assert [r["samples"] for r in rows[4:STEPS - 1]] == [r["samples"] for r in ref_rows[5:STEPS]]
    (event,) = [json.loads(line) for line in (run_dir / "guard_events.jsonl").read_text().splitlines()]
    assert event["step"] == 5 and event["action"] == "rollback" and event["samples"] == ref_rows[4]["samples"]


@pytest.mark.slow
def test_two_process_async_checkpoints_complete_and_train_like_synchronous_ones(corpus, uninterrupted, tmp_path):
    run_dir = tmp_path / "async"
    torchrun(args(corpus, run_dir, "checkpoint.async_save=true"), timeout=120)
    assert losses(run_dir) == losses(uninterrupted)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000010", "step-0000012"]
    for name in ("step-0000010", "step-0000012"):
        assert (run_dir / "checkpoints" / name / "COMPLETE").is_file()
