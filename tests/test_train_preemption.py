"""Preemption: SIGTERM, SIGUSR1 or SIGINT on any rank finishes the step, writes a complete checkpoint
on every rank, prints one line and exits 3; `resume=auto` then continues exactly where the
uninterrupted run would be, with no sample trained twice.

The signals are real: sent by the test from outside, or by the training process to itself through
MPTLIKE_FAULTS (mptlike.faults) at a given step and rank, which reaches the same handler.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import losses, make_corpus, tiny_args, torchrun, torchrun_cmd, torchrun_env

from mptlike.errors import EXIT_PREEMPTED

STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, run_dir, *extra):
    # Checkpoints every 4 steps: a preemption checkpoint falls between them. Dropout on, so the RNG
    # state must resume exactly too.
    return tiny_args(corpus, run_dir, f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=4",
                     "eval.every_n_steps=0", "eval.at_end=false", "debug.log_sample_ids=true",
                     "model.resid_pdrop=0.1", "model.emb_pdrop=0.1", *extra)


def single(cmd_args, faults="", **popen):
    return subprocess.Popen([sys.executable, "-m", "mptlike.train", *map(str, cmd_args)], env=torchrun_env(faults),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc, timeout=180):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean2") / "run"
    torchrun(args(corpus, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    code, _, err = finish(single(args(corpus, run_dir)))
    assert code == 0, err[-3000:]
    return run_dir


def sample_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def assert_preempted(code, err, run_dir):
    """Exit 3, one line naming the step and a complete checkpoint of exactly that step; returns the step."""
    assert code == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "preempted at step" in line]
    assert len(lines) == 1, err[-3000:]
    step = int(lines[0].split("preempted at step ")[1].split()[0])
    ckpt = run_dir / "checkpoints" / f"step-{step:07d}"
    assert f"checkpoint written to {ckpt}; run again with resume=auto" in lines[0]
    assert (ckpt / "COMPLETE").is_file()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert 1 <= step < STEPS
    return step


def assert_same_history(run_dir, reference):
    """Per-step losses bit for bit, and every global batch trained exactly once, in the same order."""
    assert losses(run_dir) == losses(reference)
    rows = sample_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "a step is missing or was trained twice"
    assert rows == sample_rows(reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["TERM", "USR1", "INT"])
def test_a_signal_checkpoints_the_step_exits_3_and_resume_matches_the_uninterrupted_run(corpus, uninterrupted,
                                                                                         tmp_path, sig):
    run_dir = tmp_path / "run"
    code, _, err = finish(single(args(corpus, run_dir), faults=f"signal_at_step=3,signal={sig}"))
    step = assert_preempted(code, err, run_dir)
    assert step == 3 and f"SIG{sig}" in err
    assert sorted(losses(run_dir)) == [1, 2, 3]
    code, _, err = finish(single(args(corpus, run_dir)))
    assert code == 0, err[-3000:]
    assert "resuming" in err and "step-0000003" in err
    assert_same_history(run_dir, uninterrupted)


@pytest.mark.slow
def test_sigterm_from_outside_at_any_moment_loses_no_step(corpus, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = single(args(corpus, run_dir))
    samples = run_dir / "samples.jsonl"
    deadline = time.monotonic() + 120
    while not (samples.is_file() and len(samples.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    step = assert_preempted(code, err, run_dir)
    assert sorted(losses(run_dir)) == list(range(1, step + 1))
    code, _, err = finish(single(args(corpus, run_dir)))
    assert code == 0, err[-3000:]
    assert_same_history(run_dir, uninterrupted)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_data_workers_checkpoints_and_resumes_exactly(corpus, uninterrupted,
                                                                                         tmp_path):
    """What SLURM's scancel and a terminal's Ctrl-C do: every process of the group gets the signal,
    the DataLoader's worker processes included; they must leave the decision to the trainer."""
    run_dir = tmp_path / "run"
    proc = single(args(corpus, run_dir, "data.num_workers=2"), start_new_session=True)
    samples = run_dir / "samples.jsonl"
    deadline = time.monotonic() + 120
    while not (samples.is_file() and len(samples.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    code, _, err = finish(proc)
    step = assert_preempted(code, err, run_dir)
    code, _, err = finish(single(args(corpus, run_dir, "data.num_workers=2")))
    assert code == 0, err[-3000:]
    assert step < STEPS
    assert_same_history(run_dir, uninterrupted)


@pytest.mark.slow
def test_a_signal_during_setup_stops_at_once_and_writes_nothing(corpus, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = finish(single(args(corpus, run_dir), faults="signal_at_step=0,signal=TERM"))
    assert code == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("mptlike-train:")]
    assert lines == ["mptlike-train: stopped by SIGTERM before training started: nothing was trained; run the same "
                     "command again to start"]
    assert "Traceback" not in err
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_resuming_an_older_step_then_preempting_names_the_new_checkpoint(corpus, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = finish(single(args(corpus, run_dir)))  # checkpoints after steps 4 and 8
    assert code == 0, err[-3000:]
    older = run_dir / "checkpoints" / "step-0000004"
    code, _, err = finish(single(args(corpus, run_dir, f"resume={older}"), faults="signal_at_step=6,signal=TERM"))
    assert assert_preempted(code, err, run_dir) == 6  # step-0000006, not the abandoned step-0000008
    # The newer checkpoint of the abandoned path is set aside, so resume=auto cannot jump onto it.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["abandoned", "step-0000004", "step-0000006"]
    assert [p.name.split("-2")[0] for p in (run_dir / "checkpoints" / "abandoned").iterdir()] == ["step-0000008"]


@pytest.mark.slow
def test_a_second_signal_while_the_checkpoint_is_written_does_not_corrupt_it(corpus, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    partial = run_dir / "checkpoints" / "step-0000002.tmp"
    # A signal during step 2; its checkpoint pauses 3 s between the shards and the COMPLETE marker.
    proc = single(args(corpus, run_dir), faults="signal_at_step=2,signal=TERM,checkpoint_delay_s=3")
    deadline = time.monotonic() + 120
    while not (partial / "train_state.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert assert_preempted(code, err, run_dir) == 2
    assert "received again" in err
    code, _, err = finish(single(args(corpus, run_dir)))
    assert code == 0, err[-3000:]
    assert_same_history(run_dir, uninterrupted)


@pytest.mark.slow
def test_a_signal_on_one_rank_of_two_stops_both_at_the_same_step(corpus, uninterrupted_two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    # Rank 1 alone gets SIGTERM during step 3; rank 0 learns it through the step's all-reduce.
    proc = subprocess.run(torchrun_cmd(args(corpus, run_dir)), capture_output=True, text=True, timeout=300,
                          env=torchrun_env("signal_at_step=3,signal=TERM,signal_rank=1"))
    step = assert_preempted_under_torchrun(proc, run_dir)
    assert step == 3
    torchrun(args(corpus, run_dir))
    assert_same_history(run_dir, uninterrupted_two_ranks)


@pytest.mark.slow
def test_sigterm_to_torchrun_reaches_every_rank_and_each_checkpoints(corpus, uninterrupted_two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(args(corpus, run_dir)), env=torchrun_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    samples = run_dir / "samples.jsonl"
    deadline = time.monotonic() + 180
    while not (samples.is_file() and len(samples.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # what SLURM or Kubernetes sends the launcher
    out, err = proc.communicate(timeout=180)
    step = assert_preempted_under_torchrun(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run_dir)
    assert sorted(losses(run_dir)) == list(range(1, step + 1))
    torchrun(args(corpus, run_dir))
    assert_same_history(run_dir, uninterrupted_two_ranks)


def assert_preempted_under_torchrun(proc, run_dir):
    """torchrun reports its workers' exit code 3 as a failure; each worker printed its own outcome."""
    assert proc.returncode != 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "mptlike-train: preempted at step" in line]
    assert len(lines) == 1, proc.stderr[-4000:]  # rank 0 speaks for the run
    step = int(lines[0].split("preempted at step ")[1].split()[0])
    assert (run_dir / "checkpoints" / f"step-{step:07d}" / "COMPLETE").is_file()
    assert json.loads((run_dir / "checkpoints" / f"step-{step:07d}" / "train_state.json").read_text())[
        "world_size"] == 2
    assert "exitcode  : 3" in proc.stderr or "exit code 3" in proc.stderr or "exitcode: 3" in proc.stderr \
        or "SignalException" in proc.stderr, proc.stderr[-4000:]
    return step


