"""A wrong override exits with code 2 and one readable line, before anything starts or is written."""

import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from mptlike.errors import MptlikeError
from mptlike.train.cli import main
from mptlike.train.config import compose_config, conf_dir, config_to_dict, to_train_config


def _run_main(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "override, words",
    [
        ("trainer.max_stepz=10", ["unknown config key", "trainer.max_stepz"]),
        ("+foo=1", ["unknown config key 'foo' (from +foo=1)"]),
        ("+trainer.max_stepz=10", ["unknown config key 'trainer.max_stepz'"]),
        ("+model.bar=2", ["unknown config key 'model.bar'"]),
        ("model.d_model=100", ["model.d_model=100", "model.n_heads=8"]),
        ("model.d_model=abc", ["model.d_model=abc", "Integer"]),
        ("trainer.global_batch_size=12", ["trainer.global_batch_size=12", "micro_batch_size"]),
        ("optim.betas=[0.9]", ["optim.betas"]),
        ("model=mpt-9b", ["model=mpt-9b", "mpt-7b"]),
        ("resume=/no/such/checkpoint", ["resume=/no/such/checkpoint"]),
        ("logger.mode=sometimes", ["logger.mode=sometimes is unknown", "offline, online, disabled"]),
        ("optim.name=adam", ["optim.name=adam is unknown", "decoupled_adamw, decoupled_lionw"]),
        ("trainer.backend=ray", ["trainer.backend=ray is unknown", "lightning, composer"]),
        ("trainer.precision=fp16", ["trainer.precision=fp16 is unknown", "auto, fp32, bf16"]),
        ("guard.nonfinite=retry", ["guard.nonfinite=retry is unknown", "stop, skip, rollback"]),
        ("guard.max_skips=-1", ["guard.max_skips=-1 is invalid"]),
        ("data=folder", ["data.path has no default", "data.path="]),
    ],
)
def test_bad_override_exits_2_with_one_line_naming_the_key_and_writes_nothing(
    capsys, tmp_path, monkeypatch, override, words
):
    monkeypatch.chdir(tmp_path)  # the default data and run folders are relative
    run_dir = tmp_path / "run"
    code, out, err = _run_main(capsys, [f"run_dir={run_dir}", override])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mptlike-train: error: ")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in err
    assert not run_dir.exists()
    assert not (tmp_path / "data").exists()


def test_missing_data_folder_exits_2_and_writes_nothing(capsys, tmp_path):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-such-data"
    code, _, err = _run_main(capsys, [f"run_dir={run_dir}", "data=folder", f"data.path={missing}"])
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert f"data.path={missing} does not exist" in err
    assert not run_dir.exists() and not missing.exists()


def test_console_command_exits_2_on_an_unknown_key_before_any_process_starts(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "MPTLIKE_DATA": str(tmp_path / "data")}
    proc = subprocess.run(
        [sys.executable, "-m", "mptlike.train", f"run_dir={run_dir}", "trainer.learning_rate=1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mptlike-train: error: unknown config key 'trainer.learning_rate': check its spelling "
        "(`mptlike-train --help` lists the keys)"
    ]
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_help_lists_every_config_group(capsys):
    code, out, _ = _run_main(capsys, ["--help"])
    assert code == 0
    for group in ("model=", "data=", "optim=", "trainer=", "logger=", "experiment="):
        assert group in out
    assert "mpt-70b" in out and "wandb" in out


def test_cfg_prints_the_resolved_config_without_writing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run_main(capsys, ["--cfg", "optim.lr=0.01"])
    assert code == 0
    assert "lr: 0.01" in out and "run_dir: runs/quickstart" in out
    assert list(tmp_path.iterdir()) == []


def test_a_bad_choice_in_a_conf_file_names_the_key_while_composing(tmp_path):
    shutil.copytree(conf_dir(), tmp_path / "conf")
    (tmp_path / "conf" / "optim" / "sgd.yaml").write_text("name: sgd\n")
    with pytest.raises(MptlikeError) as err:
        compose_config(["optim=sgd"], tmp_path / "conf")
    assert str(err.value) == (
        "optim.name=sgd is unknown (set in conf/optim/sgd.yaml): choose one of decoupled_adamw, decoupled_lionw"
    )


def test_choices_compose_to_enum_members_that_compare_and_print_as_their_strings():
    cfg = to_train_config(compose_config(["trainer=composer", "optim.impl=for", "logger=wandb"]))
    backend = cfg.trainer.backend
    assert type(backend).__name__ == "Backend" and backend == "composer"
    assert (str(backend), f"{backend}", f"{backend:>9}") == ("composer", "composer", " composer")
    assert {"composer": 1}[backend] == 1  # hashes as the string, so tables keyed by name still work
    assert cfg.optim.impl == "for" and cfg.logger.name == "wandb"
    saved = config_to_dict(cfg)  # what run_dir/config.yaml and the W&B config get: plain strings
    assert type(saved["trainer"]["backend"]) is str and type(saved["optim"]["impl"]) is str
    assert "backend: composer\n" in OmegaConf.to_yaml(saved)
