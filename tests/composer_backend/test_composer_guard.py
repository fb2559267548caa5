"""guard.nonfinite with trainer.backend=composer: a real NaN loss (MPTLIKE_FAULTS) is skipped as the Lightning loop
skips it, or stops the run.

The reference for skip is the Lightning loop given the same fault: an independent implementation
(it never calls optimizer.step(); Composer's step runs with every gradient dropped).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from composer_runs import MAX_STEPS, composer_process, read_metrics, small_run, train_with_composer

pytest.importorskip("composer")

pytestmark = [pytest.mark.composer, pytest.mark.filterwarnings("ignore::UserWarning")]

REL = 1e-4
POISONED = 2


@pytest.fixture
def nan_at_step_2(monkeypatch):
    monkeypatch.setenv("MPTLIKE_FAULTS", f"nan_at_step={POISONED}")


def test_skip_drops_the_poisoned_update_and_trains_on_like_the_lightning_loop(corpus, tmp_path, nan_at_step_2):
    from mptlike.integrations.composer.checkpoints import read_composer_checkpoint
    from mptlike.train.cli import main

    reference_dir, run_dir = tmp_path / "lightning", tmp_path / "composer"
    assert main(small_run(corpus, reference_dir, "guard.nonfinite=skip")) == 0
    assert train_with_composer(small_run(corpus, run_dir, "guard.nonfinite=skip")).final_step == MAX_STEPS

    got, reference = read_metrics(run_dir), read_metrics(reference_dir)
    assert [s for s in sorted(got) if got[s].get("train/skipped_step")] == [POISONED]
    assert math.isnan(got[POISONED]["train/loss"])
    trained = [s for s in range(1, MAX_STEPS + 1) if s != POISONED]
    for name in ("train/loss", "train/grad_norm"):
        assert [got[s][name] for s in trained] == pytest.approx([reference[s][name] for s in trained], rel=REL), name
    _, state = read_composer_checkpoint(run_dir / "checkpoints")
    assert all(torch.isfinite(t).all() for t in state.values())
    events = [json.loads(line) for line in (run_dir / "guard_events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["action"]) for e in events] == [(POISONED, "skip")]


def test_stop_exits_2_with_one_line_naming_the_step_before_the_update(corpus, tmp_path):
    run_dir = tmp_path / "run"
    done = composer_process(small_run(corpus, run_dir, "guard.nonfinite=stop"), faults=f"nan_at_step={POISONED}")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("mptlike-train: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert f"step {POISONED}: non-finite loss nan" in errors[0] and "guard.nonfinite=skip" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (run_dir / "checkpoints" / f"ep0-ba{POISONED}-rank0.pt").exists()
