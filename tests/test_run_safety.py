"""Run safety: a resume that refuses another run's checkpoint, falls back past a damaged one, one run
per run_dir, and nothing written by a run that fails before it starts."""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from train_helpers import losses, make_corpus, tiny_args, torchrun_env

from mptlike.data import Manifest
from mptlike.data.prep import prepare
from mptlike.train.checkpoint import Checkpointer, checkpoint_problem, intact_checkpoints
from mptlike.train.cli import main
from mptlike.train.layout import LOCK


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, run_dir, *extra):
    return tiny_args(corpus, run_dir, "eval.every_n_steps=0", "eval.at_end=false", *extra)


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """Six steps, checkpoints after steps 3 and 6, all kept, and the final weights."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(args(corpus, run_dir, "checkpoint.export_final=true")) == 0
    return run_dir


def snapshot(folder):
    """Every file under `folder` with its bytes' digest: equal snapshots mean nothing was touched (the
    lock file says who holds the folder, so it changes whenever a run got as far as taking it)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != LOCK}


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mptlike-train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- resume refuses another run ----------------------------------------------------------------


def test_resume_auto_refuses_a_checkpoint_of_another_model_and_touches_nothing(capsys, corpus, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    before = snapshot(run_dir)
    assert main(args(corpus, run_dir, "model.n_layers=1", "trainer.max_steps=9")) == 2
    line = one_error_line(capsys)
    assert "model.n_layers=1 (checkpoint: 2)" in line
    assert "restore those settings" in line and "another run_dir" in line
    assert snapshot(run_dir) == before


def test_resume_refuses_data_made_with_another_tokenizer(capsys, corpus, finished, tmp_path):
    import json as json_module

    other = tmp_path / "bpe"
    files = sorted(Path(json_module.__file__).parent.glob("*.py"))
    prepare(files, other, "bpe:300", progress=False)
    assert Manifest.load(other).tokenizer != Manifest.load(corpus).tokenizer
    run_dir = copy_run(finished, tmp_path / "run")
    before = snapshot(run_dir)
    assert main(args(other, run_dir, "trainer.max_steps=9")) == 2
    line = one_error_line(capsys)
    assert "data.tokenizer=" in line and "(checkpoint: bytes" in line
    assert snapshot(run_dir) == before


def test_resume_allows_what_does_not_change_the_run_and_continues_exactly(corpus, finished, tmp_path):
    """More steps, another attention backend, logging and evaluation settings: the same run goes on."""
    longer = tmp_path / "longer"
    assert main(args(corpus, longer, "trainer.max_steps=8")) == 0
    run_dir = copy_run(finished, tmp_path / "run")
    # The schedule is a function of trainer.max_steps, so the reference is a run planned for 8 steps.
    ckpt = longer / "checkpoints" / "step-0000006"
    assert main(args(corpus, run_dir, "trainer.max_steps=8", f"resume={ckpt}", "model.attn_impl=torch",
                     "trainer.log_every_n_steps=2", "eval.max_samples=4")) == 0
    assert losses(run_dir)[8] == pytest.approx(losses(longer)[8], abs=1e-5)


# ---- damaged checkpoints -------------------------------------------------------------------------


def _truncate_a_shard(ckpt):
    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return "has"


def _remove_metadata(ckpt):
    (ckpt / ".metadata").unlink()
    return ".metadata"


def _garbage_train_state(ckpt):
    (ckpt / "train_state.json").write_text("{not json")
    return "train_state.json"


@pytest.mark.parametrize("damage", [_truncate_a_shard, _remove_metadata, _garbage_train_state])
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(caplog, corpus, finished, tmp_path, damage):
    run_dir = copy_run(finished, tmp_path / "run")
    damaged = run_dir / "checkpoints" / "step-0000006"
    words = damage(damaged)
    assert checkpoint_problem(damaged) is not None
    assert [step for step, _ in intact_checkpoints(run_dir)] == [3]
    assert main(args(corpus, run_dir)) == 0
    warning = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    assert warning and str(damaged) in warning[0] and words in warning[0]
    # Steps 4-6 were trained again from step 3: the same losses, bit for bit.
    assert losses(run_dir) == losses(finished)
    assert checkpoint_problem(damaged) is None  # step 6 was written again, whole


def test_resume_path_to_a_damaged_checkpoint_is_one_line(capsys, corpus, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step-0000003"
    _truncate_a_shard(ckpt)
    assert main(args(corpus, tmp_path / "new", f"resume={ckpt}")) == 2
    line = one_error_line(capsys)
    assert f"resume={ckpt} is damaged" in line and "bytes" in line
    assert not (tmp_path / "new").exists()


def test_pruning_keeps_the_last_intact_checkpoint_when_newer_ones_are_damaged(tmp_path):
    import torch

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    from mptlike.train.loop import Progress

    for step in (1, 2):
        Checkpointer(tmp_path).save(step, model, optimizer, {"progress": Progress(step=step)})
    _truncate_a_shard(tmp_path / "checkpoints" / "step-0000002")
    Checkpointer(tmp_path, keep_last=1)._prune()
    # Step 2 is damaged, so step 1 is the one kept; pruning by count alone would have deleted it.
    assert [step for step, _ in intact_checkpoints(tmp_path)] == [1]


# ---- one run per run_dir ------------------------------------------------------------------------


def test_a_second_run_on_a_busy_run_dir_stops_with_one_line_and_a_killed_holder_frees_it(capsys, corpus, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "mptlike.train",
                               *args(corpus, run_dir, "trainer.max_steps=100000", "checkpoint.every_n_steps=0")],
                              env=torchrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ((run_dir / LOCK).is_file() and (run_dir / LOCK).read_text()):
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert main(args(corpus, run_dir, "trainer.max_steps=2")) == 2
        line = one_error_line(capsys)
        assert f"run_dir={run_dir} is in use by another run (pid {holder.pid} on " in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 leaves no stuck lock: the kernel released it with the process.
    fd = os.open(run_dir / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_read_only_run_dir_is_one_line(capsys, corpus, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    assert main(args(corpus, parent / "run")) == 2
    assert "cannot be written" in one_error_line(capsys)


# ---- nothing written before the run starts ----------------------------------------------------------


def test_a_run_with_a_truncated_init_from_writes_nothing(capsys, corpus, finished, tmp_path):
    weights = copy_run(finished / "final", tmp_path / "init")
    blob = weights / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-100])
    run_dir = tmp_path / "run"
    assert main(args(corpus, run_dir, f"init_from={weights}")) == 2
    line = one_error_line(capsys)
    assert "model.safetensors is damaged" in line
    assert not run_dir.exists()


def test_a_run_with_a_corrupt_init_from_config_writes_nothing(capsys, corpus, finished, tmp_path):
    weights = copy_run(finished / "final", tmp_path / "init")
    (weights / "config.json").write_text("{oops")
    assert main(args(corpus, tmp_path / "run", f"init_from={weights}")) == 2
    assert "config.json is unreadable" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_negative_data_workers_is_one_line(capsys, corpus, tmp_path):
    assert main(args(corpus, tmp_path / "run", "data.num_workers=-1")) == 2
    assert "data.num_workers=-1 is invalid" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_during_setup_leaves_no_config_and_the_corrected_rerun_starts(capsys, corpus, tmp_path,
                                                                                     monkeypatch):
    import mptlike.train.loop as loop

    def broken(*a, **k):
        raise RuntimeError("the device is gone")  # any failure while building the model

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "build_model", broken)
        with pytest.raises(RuntimeError):
            main(args(corpus, run_dir, "trainer.max_steps=2"))
    assert not (run_dir / "config.yaml").exists()
    # Not "holds another run": the failed start left nothing behind that a corrected run would trip on.
    assert main(args(corpus, run_dir, "trainer.max_steps=2", "seed=5")) == 0


def test_a_no_op_rerun_does_not_rewrite_the_config(corpus, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    saved = (run_dir / "config.yaml").read_text()
    assert main(args(corpus, run_dir, "eval.max_samples=4")) == 0  # already at max_steps: nothing to train
    assert (run_dir / "config.yaml").read_text() == saved


# ---- damaged data mid-run ------------------------------------------------------------------------------


def test_token_ids_beyond_the_vocabulary_stop_the_run_with_one_line(capsys, corpus, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["shards"]["train"][0]["name"]
    tokens = np.fromfile(shard, dtype=manifest["dtype"])
    tokens[::50] = 300  # ids the byte tokenizer (vocab 257) never makes; the model has 320
    tokens.tofile(shard)
    assert main(args(data, tmp_path / "run", "data.verify=false")) == 2
    line = one_error_line(capsys)
    assert "holds token id 300, beyond the tokenizer's 257 ids" in line and "data.verify=true" in line


# ---- a disk that is nearly full ---------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A real 4 MB tmpfs: room for two of the tiny model's checkpoints (1.6 MB each), not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_nearly_full_disk_prunes_before_writing_and_the_run_completes(caplog, corpus, small_disk, tmp_path):
    run_dir = small_disk / "run"
    assert main(args(corpus, run_dir, "checkpoint.every_n_steps=2", "checkpoint.keep_last=2")) == 0
    assert [step for step, _ in intact_checkpoints(run_dir)] == [4, 6]
    assert any("little disk space left" in r.getMessage() for r in caplog.records)
    reference = tmp_path / "reference"
    assert main(args(corpus, reference, "checkpoint.every_n_steps=2", "checkpoint.keep_last=2")) == 0
    assert losses(run_dir) == losses(reference)


def test_an_older_checkpoint_without_a_recorded_run_that_does_not_fit_is_one_line(capsys, corpus, finished,
                                                                                  tmp_path):
    """Checkpoints written before they recorded their run: the mismatch shows when the tensors load."""
    run_dir = copy_run(finished, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step-0000006"
    state = json.loads((ckpt / "train_state.json").read_text())
    del state["identity"]
    (ckpt / "train_state.json").write_text(json.dumps(state))
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 6, "world_size": 1}))  # the old marker: no inventory
    before = snapshot(run_dir)
    assert main(args(corpus, run_dir, "model.d_model=32", "trainer.max_steps=8")) == 2
    line = one_error_line(capsys)
    assert f"{ckpt} does not load into this model and optimizer" in line
    assert snapshot(run_dir) == before


def test_a_full_disk_during_the_final_export_is_one_line_and_the_rerun_finishes_it(capsys, corpus, tmp_path,
                                                                                    monkeypatch):
    import errno

    from mptlike.model import MPTForCausalLM

    run_dir = tmp_path / "run"
    run_args = args(corpus, run_dir, "checkpoint.export_final=true")

    def full_disk(self, folder, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(MPTForCausalLM, "save_pretrained", full_disk)
        assert main(run_args) == 2
    line = one_error_line(capsys)
    assert f"disk full while writing the final weights {run_dir / 'final'}" in line and "run the same command" in line
    assert not (run_dir / "final").exists() and not (run_dir / "final.tmp").exists()
    trained = losses(run_dir)
    assert main(run_args) == 0  # the steps are done: this run only writes the export
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert losses(run_dir) == trained
    loaded = MPTForCausalLM.from_pretrained(run_dir / "final")
    assert loaded.config.n_layers == 2


def test_a_model_that_cannot_fit_this_machine_is_refused_before_anything_is_allocated(capsys, corpus, tmp_path):
    # mpt-7b on a CPU: ~100 GB of fp32 weights, gradients and Adam moments, on a machine of a few dozen.
    run_dir = tmp_path / "run"
    assert main(["model=mpt-7b", "trainer=cpu", "data=folder", f"data.path={corpus}", f"run_dir={run_dir}"]) == 2
    line = one_error_line(capsys)
    assert "needs about" in line and "GB per process" in line and "--estimate-memory" in line
    assert not run_dir.exists()


def test_flex_attention_on_a_cpu_is_refused_before_the_run_starts(capsys, corpus, tmp_path):
    assert main(args(corpus, tmp_path / "run", "model.attn_impl=flex")) == 2
    assert "model.attn_impl=flex cannot train on CPU" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_starting_over_in_a_run_dir_starts_a_new_wandb_run(corpus, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "wandb_run_id").write_text("oldrun12345\n")
    assert main(args(corpus, run_dir, "resume=never", "checkpoint.overwrite=true", "trainer.max_steps=2")) == 0
    assert not (run_dir / "wandb_run_id").exists()  # logger=wandb would now create a fresh id
