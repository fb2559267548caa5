"""W&B in offline mode: the run folder under run_dir holds the config and every logged metric.

The run's `.wandb` file is read directly: it is a LevelDB-style log (32 KiB blocks of records,
each with a 7-byte header: crc32, length, type) of W&B's protobuf `Record` messages.
"""

import json
import math
import struct
import sys
import textwrap
from pathlib import Path

import pytest

from mptlike.data.prep import prepare
from mptlike.train.cli import main

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FIRST:
            pending = chunk
            continue
        if kind == _MIDDLE:
            pending += chunk
            continue
        raw = pending + chunk if kind == _LAST else chunk
        pending = b""
        record = pb.Record()
        record.ParseFromString(raw)
        yield record


@pytest.fixture()
def corpus(tmp_path):
    out = tmp_path / "corpus"
    prepare(sorted(Path(json.__file__).parent.glob("*.py")), out, "bytes", val_inputs=[textwrap.__file__],
            progress=False)
    return out


@pytest.fixture()
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline with its config, cache and data folders in tmp_path, and no key or run id inherited."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    for var, folder in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                        ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_offline_wandb_run_dir_holds_the_config_tags_and_every_logged_metric(corpus, tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    args = [
        "trainer=cpu", "model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.max_seq_len=32",
        "model.vocab_size=320", "data=folder", f"data.path={corpus}", "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "eval.every_n_steps=2", "eval.max_samples=4", "checkpoint.every_n_steps=0",
        "checkpoint.export_final=false", "sample.max_new_tokens=0", "logger=wandb", "logger.mode=offline",
        "logger.tags=[cpu,smoke]", "name=wandb-smoke", f"run_dir={run_dir}",
    ]
    assert main(args) == 0
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history, run_record = [], None
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            # W&B stores a name with "/" either whole in `key` or split into `nested_key`.
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            run_record = record.run
    assert run_record is not None
    assert run_record.display_name == "wandb-smoke"
    assert list(run_record.tags) == ["cpu", "smoke"]
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["model"]["d_model"] == 64
    assert config["trainer"]["max_steps"] == 3
    assert config["logger"]["mode"] == "offline"
    train = {h["trainer/global_step"]: h for h in history if "train/loss" in h}
    assert sorted(train) == [1, 2, 3]
    for h in train.values():
        for name in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tflops_per_device"):
            assert math.isfinite(h[name]), (name, h)
    val = [h for h in history if "val/loss" in h]
    assert [h["trainer/global_step"] for h in val] == [2, 3]
    assert all(h["val/perplexity"] > 1 for h in val)
    assert (run_dir / "config.yaml").is_file()


def test_wandb_environment_variables_apply_unless_the_command_line_says_otherwise(monkeypatch):
    from mptlike.train.config import compose_config, to_train_config

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-3")
    monkeypatch.setenv("WANDB_TAGS", "a, b")
    cfg = to_train_config(compose_config(["logger=wandb", "logger.project=from-cli"]))
    lg = cfg.logger
    assert (str(lg.mode), lg.project, lg.entity, lg.group, list(lg.tags)) == ("online", "from-cli", "team", "sweep-3",
                                                                             ["a", "b"])
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's older spelling of offline
    assert str(to_train_config(compose_config(["logger=wandb"])).logger.mode) == "offline"


def test_a_bad_wandb_mode_in_the_environment_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert main(["logger=wandb", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mptlike-train: error: WANDB_MODE='sometimes' is not a valid logger.mode: use online, offline or "
                   "disabled (or unset WANDB_MODE)")
    assert not (tmp_path / "run").exists()


def test_logger_wandb_without_wandb_installed_exits_2_naming_the_extra_and_writes_nothing(capsys, monkeypatch,
                                                                                          tmp_path):
    from mptlike.train.config import compose_config, to_train_config
    from mptlike.train.plan import check_wandb_installed

    monkeypatch.chdir(tmp_path)  # the default corpus would be prepared under ./data, the run under ./run
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what the import system reports where wandb is not installed
    assert main(["logger=wandb", "run_dir=run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mptlike-train: error: logger=wandb needs Weights & Biases, which is not installed here: "
        "pip install 'mptlike[wandb]' (or use logger=csv)")
    assert list(tmp_path.iterdir()) == []
    # logger.mode=disabled logs nothing, so it needs no wandb.
    check_wandb_installed(to_train_config(compose_config(["logger=wandb", "logger.mode=disabled"])))


def test_wandb_mode_disabled_in_the_environment_writes_no_wandb_files(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    args = [
        "trainer=cpu", "model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.max_seq_len=32",
        "model.vocab_size=320", "data=folder", f"data.path={corpus}", "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2", "trainer.max_steps=2", "trainer.progress_bar=false", "eval.every_n_steps=0",
        "eval.at_end=false", "checkpoint.every_n_steps=0", "checkpoint.export_final=false", "sample.max_new_tokens=0",
        "logger=wandb", f"run_dir={run_dir}",
    ]
    assert main(args) == 0
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_run_id").exists()


def _model_run(corpus, run_dir, *extra):
    """A 1-layer model, exported to final/, logging to W&B offline."""
    return main(["trainer=cpu", "model.d_model=32", "model.n_heads=4", "model.n_layers=1", "model.max_seq_len=16",
                 "model.vocab_size=320", "data=folder", f"data.path={corpus}", "trainer.global_batch_size=2",
                 "trainer.micro_batch_size=2", "trainer.progress_bar=false", "eval.every_n_steps=0",
                 "eval.at_end=false", "checkpoint.every_n_steps=0", "sample.max_new_tokens=0", "logger=wandb",
                 "logger.mode=offline", f"run_dir={run_dir}", *extra])


def _artifacts(run_dir):
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return [r.artifact for r in wandb_records(wandb_file) if r.WhichOneof("record_type") == "artifact"]


def test_log_model_stores_the_exported_folder_as_a_wandb_model_artifact(corpus, tmp_path, offline_wandb):
    import base64
    import hashlib

    run_dir = tmp_path / "run"
    assert _model_run(corpus, run_dir, "trainer.max_steps=2", "logger.log_model=true") == 0
    artifacts = _artifacts(run_dir)
    assert len(artifacts) == 1
    artifact = artifacts[0]
    assert artifact.type == "model" and artifact.name.startswith("model-")
    assert set(artifact.aliases) >= {"latest", "step-2"}
    exported = {p.name: p for p in (run_dir / "final").iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors"} <= set(exported)
    entries = {e.path: e for e in artifact.manifest.contents}
    assert set(entries) == set(exported)
    for name, entry in entries.items():  # W&B's digest: the file's md5, base64
        assert entry.digest == base64.b64encode(hashlib.md5(exported[name].read_bytes()).digest()).decode(), name


def test_without_log_model_no_artifact_is_logged(corpus, tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    assert _model_run(corpus, run_dir, "trainer.max_steps=1") == 0
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert not _artifacts(run_dir)
