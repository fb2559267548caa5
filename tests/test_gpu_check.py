"""`make gpu-check` (benchmarks/gpu_check.py) in its CPU mode, so that the prepared GPU run cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

STAGE_NAMES = ["env", "matmul", "attention_check", "attention_triton", "attention_flex", "attention_sdpa",
               "attention_flash", "throughput_mpt1b", "throughput_7b_slice", "gpu_tests", "gpu_train_tests",
               "memory"]
NEED_CUDA = {"attention_triton", "attention_flash", "gpu_tests", "gpu_train_tests"}


def test_stage_time_limits_add_up_to_at_most_9_minutes():
    assert [s.name for s in gpu_check.STAGES] == STAGE_NAMES
    assert sum(s.timeout_s for s in gpu_check.STAGES) <= gpu_check.BUDGET_S <= 9 * 60 - 10


@pytest.mark.slow
def test_cpu_mode_runs_every_stage_with_tiny_shapes_and_writes_summary_and_json(tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 120
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "summary.md"]
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in payload["stages"]}
    assert payload["mode"] == "cpu" and list(stages) == STAGE_NAMES
    for name, stage in stages.items():
        if name in NEED_CUDA:
            assert stage["status"] == "skipped" and "CUDA" in stage["reason"]
        else:
            assert stage["status"] == "ok", stage
    assert all(row["status"] in ("ok", "n/a") for row in stages["attention_check"]["data"]["rows"])
    assert stages["throughput_mpt1b"]["data"]["tokens_per_sec"] > 0
    assert stages["memory"]["data"]["rows"][0]["estimated_gb"] > 0
    summary = (tmp_path / "summary.md").read_text()
    for heading in ("### Stages", "### Attention correctness", "### Attention, causal ALiBi", "### Training throughput",
                    "### Memory estimate", "### Targets"):
        assert heading in summary
    assert "- gpu_tests: needs CUDA" in summary


def test_a_stage_that_hangs_is_stopped_at_its_limit_and_the_next_stage_still_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGES", [
        gpu_check.Stage("hang", 2, lambda gpu, out: [sys.executable, "-c", "import time; time.sleep(120)"]),
        gpu_check.Stage("after", 30, lambda gpu, out: [sys.executable, "-c", "print('still here')"]),
    ])
    started = time.monotonic()
    assert gpu_check.main(["--cpu", "--out", str(tmp_path)]) == 1
    assert time.monotonic() - started < 30
    stages = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["stages"]}
    assert stages["hang"]["status"] == "timeout" and stages["after"]["status"] == "ok"
    assert "still here" in (tmp_path / "gpu_check.log").read_text()
    assert "| hang | timeout |" in (tmp_path / "summary.md").read_text()


def test_a_stage_gets_no_more_than_the_time_left_in_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGES", [
        gpu_check.Stage("slow", 60, lambda gpu, out: [sys.executable, "-c", "import time; time.sleep(120)"]),
        gpu_check.Stage("late", 60, lambda gpu, out: [sys.executable, "-c", "pass"]),
    ])
    assert gpu_check.main(["--cpu", "--out", str(tmp_path), "--budget-s", "4"]) == 1
    stages = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["stages"]}
    assert stages["slow"]["status"] == "timeout" and stages["slow"]["timeout_s"] <= 4
    assert stages["late"]["status"] == "skipped" and "budget" in stages["late"]["reason"]


def test_the_float8_stage_runs_only_when_named_and_its_table_reaches_the_summary(tmp_path, monkeypatch):
    pytest.importorskip("torchao.float8", reason="needs torchao (pip install 'mptlike[float8]')")
    assert "float8" not in STAGE_NAMES and [s.name for s in gpu_check.OPT_IN_STAGES] == ["float8"]
    assert "needs CUDA" in gpu_check.OPT_IN_STAGES[0].command(False, tmp_path / "float8.json")
    # Its script in CPU mode (tiny shapes, torch's CPU float8 matmul) stands in for the GPU command.
    monkeypatch.setattr(gpu_check, "OPT_IN_STAGES", [gpu_check.Stage("float8", 60, lambda gpu, out: [
        sys.executable, str(ROOT / "benchmarks" / "float8_check.py"), "--cpu", "--out", str(out)])])
    assert gpu_check.main(["--cpu", "--out", str(tmp_path), "--only", "float8"]) == 0
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["float8"] and stages[0]["status"] == "ok"
    rows = {r["variant"]: r for r in stages[0]["data"]["rows"]}
    assert list(rows) == ["bf16", "tensorwise", "rowwise"]
    assert rows["bf16"]["float8_layers"] == 0 and rows["tensorwise"]["float8_layers"] == 8
    assert 0 < rows["rowwise"]["max_rel_loss_diff_vs_bf16"] < 0.05
    summary = (tmp_path / "summary.md").read_text()
    assert "### float8 training against bf16" in summary and "| tensorwise | 8 |" in summary
