"""A full disk during a checkpoint, run folders that belong to another run, credentials, pickle."""

import ast
import errno
import os
from pathlib import Path

import pytest
import yaml
from train_helpers import losses, make_corpus, tiny_args

from mptlike.train.checkpoint import complete_checkpoints
from mptlike.train.cli import main
from mptlike.train.redact import REDACTED, redact


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def fast(corpus, run_dir, *extra):
    return tiny_args(corpus, run_dir, "eval.every_n_steps=0", "eval.at_end=false", *extra)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_loadable(capsys, corpus, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    write_data = FileSystemWriter.write_data

    def full_disk(self, plan, planner):
        if "step-0000004" in str(self.path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_data(self, plan, planner)

    run_dir = tmp_path / "full"
    args = fast(corpus, run_dir, "checkpoint.every_n_steps=2", "checkpoint.keep_last=1")
    with monkeypatch.context() as patch:
        patch.setattr(FileSystemWriter, "write_data", full_disk)
        assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mptlike-train: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"disk full while writing checkpoint {run_dir / 'checkpoints' / 'step-0000004'}" in lines[0]
    assert "free space on that disk" in lines[0] and "resume=auto continues from the newest" in lines[0]
    # No half-written folder is left, and keep_last did not prune the only good checkpoint.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000002"]
    assert [step for step, _ in complete_checkpoints(run_dir)] == [2]
    before = losses(run_dir)
    assert sorted(before) == [1, 2, 3, 4]  # step 4 was trained and logged; its checkpoint failed
    # The disk has room again: resume=auto loads step 2 and replays steps 3 and 4 exactly.
    assert main(args) == 0
    after = losses(run_dir)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert after[3] == before[3] and after[4] == before[4]


def test_a_fresh_run_refuses_a_run_dir_that_holds_another_runs_config(capsys, corpus, tmp_path):
    run_dir = tmp_path / "taken"
    first = fast(corpus, run_dir, "trainer.max_steps=1", "checkpoint.save_final=false")
    assert main(first) == 0
    saved = (run_dir / "config.yaml").read_text()
    assert main([*first, "seed=99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("mptlike-train: error: ")
    assert f"run_dir={run_dir} holds another run (seed=99 (saved 17))" in err
    assert "checkpoint.overwrite=true" in err and "Traceback" not in err
    assert (run_dir / "config.yaml").read_text() == saved
    # The same run restarted (e.g. killed before its first checkpoint) may run longer...
    assert main([*first, "trainer.max_steps=2"]) == 0
    # ...and the user can say so explicitly.
    assert main([*first, "seed=99", "checkpoint.overwrite=true"]) == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 99


def test_credentials_are_redacted_but_counts_named_like_tokens_are_kept():
    key = "wandb-key-0123456789abcdef"
    cfg = {"logger": {"api_key": "x", "tags": [f"key={key}"], "project": "p"}, "hf_token": "hf_x",
           "db": {"Password": "p", "secret": None}, "sample": {"max_new_tokens": 64}, "tokens_per_step": 8,
           "storage_options": {"key": "AKIA0", "secret": "s", "endpoint_url": "http://minio:9000",
                               "client_kwargs": {"aws_secret_access_key": "s", "aws_access_key_id": "AKIA1",
                                                 "aws_session_token": "t", "region_name": "us-east-1"}}}
    out = redact(cfg, [key])
    assert out == {"logger": {"api_key": REDACTED, "tags": [REDACTED], "project": "p"}, "hf_token": REDACTED,
                   "db": {"Password": REDACTED, "secret": None}, "sample": {"max_new_tokens": 64},
                   "tokens_per_step": 8,
                   "storage_options": {"key": REDACTED, "secret": REDACTED, "endpoint_url": "http://minio:9000",
                                       "client_kwargs": {"aws_secret_access_key": REDACTED,
                                                         "aws_access_key_id": REDACTED,
                                                         "aws_session_token": REDACTED, "region_name": "us-east-1"}}}


def test_the_wandb_api_key_is_never_written_into_the_run_dir_or_the_log(capsys, corpus, tmp_path, monkeypatch):
    key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", key)
    run_dir = tmp_path / "secret"
    args = fast(corpus, run_dir, "trainer.max_steps=1", f"logger.run_name=leak-{key}", f"logger.tags=[{key}]")
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert key not in out + err
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    for path in files:
        assert key.encode() not in path.read_bytes(), path


def test_every_torch_load_in_the_package_refuses_pickle():
    root = Path(__file__).resolve().parents[1] / "mptlike"
    calls = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(root.parent)}:{node.lineno}", ok))
    assert calls, "no torch.load found: the scan is broken"
    assert [where for where, ok in calls if not ok] == []


def test_checkpoint_rng_files_load_without_pickle(corpus, tmp_path):
    import torch

    run_dir = tmp_path / "rng"
    assert main(fast(corpus, run_dir, "trainer.max_steps=1")) == 0
    (rng,) = (run_dir / "checkpoints" / "step-0000001" / "rng").iterdir()
    state = torch.load(rng, weights_only=True)
    assert set(state) >= {"python", "numpy", "torch"}
    assert os.stat(rng).st_size > 0


def test_async_checkpoints_are_complete_and_resume_like_synchronous_ones(corpus, tmp_path):
    sync_dir, async_dir, resumed = tmp_path / "sync", tmp_path / "async", tmp_path / "resumed"
    assert main(fast(corpus, sync_dir, "checkpoint.every_n_steps=2")) == 0
    assert main(fast(corpus, async_dir, "checkpoint.every_n_steps=2", "checkpoint.async_save=true")) == 0
    assert losses(async_dir) == losses(sync_dir)
    assert [s for s, _ in complete_checkpoints(async_dir)] == [2, 4, 6]
    assert not list((async_dir / "checkpoints").glob("*.tmp"))
    # A checkpoint written in the background holds the same state: resuming it replays steps 5-6 exactly.
    step4 = async_dir / "checkpoints" / "step-0000004"
    assert main(fast(corpus, resumed, f"resume={step4}")) == 0
    assert losses(resumed) == {s: v for s, v in losses(sync_dir).items() if s > 4}
