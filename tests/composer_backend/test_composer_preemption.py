"""A signal ends a Composer run with a complete checkpoint of the step it interrupted, and resume=auto loses nothing.

The signal is real: MPTLIKE_FAULTS=signal_at_step=N makes the training process send it to itself
as step N starts, so it lands while step N runs. The reference is an uninterrupted Composer run of
the same config, compared bit for bit in fp32.
"""

from __future__ import annotations

import json
import re

import pytest
from composer_runs import MAX_STEPS, composer_process, read_metrics, small_run

pytest.importorskip("composer")

pytestmark = [pytest.mark.composer, pytest.mark.filterwarnings("ignore::UserWarning")]

STOPPED_AT = 4  # small_run checkpoints at steps 3 and 6: step 4's checkpoint exists only because of the signal


@pytest.mark.parametrize("signal", ["TERM", "USR1", "INT"])
def test_a_signal_finishes_the_step_writes_its_checkpoint_and_exits_3(corpus, tmp_path, signal):
    from mptlike.integrations.composer.checkpoints import latest_checkpoint, read_composer_checkpoint

    run_dir = tmp_path / "run"
    done = composer_process(small_run(corpus, run_dir), faults=f"signal_at_step={STOPPED_AT},signal={signal}")

    assert done.returncode == 3, done.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / f"ep0-ba{STOPPED_AT}-rank0.pt"
    line = (f"mptlike-train: preempted at step {STOPPED_AT} (SIG{signal}): checkpoint written to {checkpoint}; "
            f"run again with resume=auto")
    assert line in done.stderr.splitlines(), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert latest_checkpoint(run_dir / "checkpoints") == checkpoint.resolve()
    config, state = read_composer_checkpoint(checkpoint)  # complete: it loads
    assert config is not None and state
    assert sorted(read_metrics(run_dir)) == list(range(1, STOPPED_AT + 1))
    assert not (run_dir / "final").exists()  # no export from an unfinished run


def test_resume_after_sigterm_gives_the_uninterrupted_losses_bit_for_bit_and_no_sample_twice(corpus, tmp_path):
    # The reference runs as the interrupted one does (a process of its own, one thread), so the
    # floating-point reductions are the same and equality can be exact.
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "run"
    uninterrupted = composer_process(small_run(corpus, reference_dir, "debug.log_sample_ids=true"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    preempted = composer_process(small_run(corpus, run_dir, "debug.log_sample_ids=true"),
                                 faults=f"signal_at_step={STOPPED_AT}")
    assert preempted.returncode == 3, preempted.stderr[-3000:]

    resumed = composer_process(small_run(corpus, run_dir, "debug.log_sample_ids=true", "resume=auto"))

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"trained steps {STOPPED_AT + 1}-{MAX_STEPS} ", resumed.stdout), resumed.stdout
    got, reference = read_metrics(run_dir), read_metrics(reference_dir)
    steps = list(range(1, MAX_STEPS + 1))
    assert sorted(got) == steps  # each step once: the rows after the checkpoint were not written twice
    for name in ("train/loss", "train/grad_norm", "train/lr"):
        assert [got[s][name] for s in steps] == [reference[s][name] for s in steps], name
    assert got[MAX_STEPS]["val/loss"] == reference[MAX_STEPS]["val/loss"]
    # Every global batch trained exactly once, in the uninterrupted order.
    assert _sample_rows(run_dir) == _sample_rows(reference_dir)
    assert [row["step"] for row in _sample_rows(run_dir)] == steps


def _sample_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_a_signal_on_one_rank_of_two_stops_both_at_the_same_step_and_resume_continues_exactly(
    corpus, composer_two_process_run, tmp_path
):
    run_dir = tmp_path / "run"
    # Rank 1 alone gets SIGTERM; rank 0 learns it through the step's all-reduce.
    faults = f"signal_at_step={STOPPED_AT},signal_rank=1"
    preempted = composer_process(small_run(corpus, run_dir), nproc=2, faults=faults)

    assert preempted.returncode != 0  # torchrun reports its workers' exit code 3 as a failure
    lines = [line for line in preempted.stderr.splitlines() if "mptlike-train: preempted at step" in line]
    sharded = run_dir / "checkpoints" / f"ep0-ba{STOPPED_AT}"
    assert lines == [f"mptlike-train: preempted at step {STOPPED_AT} (a signal to another rank): checkpoint written to "
                     f"{sharded}; run again with resume=auto"], preempted.stderr[-4000:]
    assert (sharded / ".metadata").is_file()
    assert sorted(read_metrics(run_dir)) == list(range(1, STOPPED_AT + 1))

    resumed = composer_process(small_run(corpus, run_dir, "resume=auto"), nproc=2)

    assert resumed.returncode == 0, resumed.stderr[-4000:]
    got, reference = read_metrics(run_dir), read_metrics(composer_two_process_run)
    steps = list(range(1, MAX_STEPS + 1))
    for name in ("train/loss", "train/grad_norm"):
        assert [got[s][name] for s in steps] == [reference[s][name] for s in steps], name
