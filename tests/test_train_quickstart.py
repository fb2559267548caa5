"""The README's main command on a fresh folder: prepares the default corpus, trains, the loss falls."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mptlike.model import MPTForCausalLM


@pytest.mark.slow
def test_quickstart_command_prepares_data_trains_with_falling_loss_and_prints_a_sample(tmp_path):
    command = Path(sys.executable).with_name("mptlike-train")
    env = {k: v for k, v in os.environ.items() if k != "MPTLIKE_DATA"}
    # The quickstart as shipped, only shorter: 12 of its 100 steps.
    args = ["trainer.max_steps=12", "trainer.log_every_n_steps=4"]
    proc = subprocess.run([str(command), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    run_dir = tmp_path / "runs" / "quickstart"
    assert (tmp_path / "data" / "stdlib-bpe8192" / "manifest.json").is_file()
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["train/loss"]) for r in rows]
    assert steps == [4, 8, 12]
    assert loss[-1] < loss[0] - 0.5, loss
    assert "train/tokens_per_sec" in rows[0]
    assert "train/loss" in proc.stdout and "sample (temperature" in proc.stdout
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "step-0000012" / "COMPLETE").is_file()
    model = MPTForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.vocab_size == 8192 and model.config.max_seq_len == 128
