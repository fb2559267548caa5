"""`pip install .` works outside a checkout: a real wheel, installed on its own, trains from another folder.

The wheel is built from a copy of the sources (pyproject.toml, README.md, mptlike/, conf/), so the
checkout gets no build/ folder whose stale files a later build would pack. It is installed with
`pip install --no-deps --target`, and every command runs with that folder first on PYTHONPATH and an
empty working directory: the .venv supplies the dependencies, the wheel supplies mptlike (asserted, so
the editable checkout cannot stand in for it).
"""

import configparser
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

pytestmark = pytest.mark.slow


def _run(args, *, timeout=300, **kwargs):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("mptlike", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheelhouse")
    # No network: the build backend is the .venv's setuptools and nothing else is fetched.
    _ok(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
              "-w", out, src]))
    wheels = list(out.glob("mptlike-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    _ok(_run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target, wheel]))
    return target


def _metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        entry_points = configparser.ConfigParser()
        entry_points.optionxform = str  # script names keep their case
        entry_points.read_string(zf.read(f"{info}/entry_points.txt").decode())
    return names, info, metadata, entry_points


def _requirement_name(requirement):
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


def test_the_wheel_holds_every_module_and_config_file_the_scripts_and_an_optional_wandb(wheel):
    names, info, metadata, entry_points = _metadata(wheel)

    conf = ROOT / "conf"
    yaml_files = {f"mptlike/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
    assert "mptlike/conf/config.yaml" in yaml_files
    assert {"data", "experiment", "logger", "model", "optim", "trainer"} <= {p.name for p in conf.iterdir()
                                                                            if p.is_dir()}
    assert sorted(yaml_files - names) == []
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mptlike").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sorted(modules - names) == []  # a subpackage missing from pyproject's `packages` list
    assert {n.split("/")[0] for n in names} == {"mptlike", info}  # no top-level `conf` or stray folder

    assert dict(entry_points["console_scripts"]) == PYPROJECT["project"]["scripts"]
    assert entry_points["console_scripts"]["mptlike-train"] == "mptlike.train.cli:main"
    assert metadata["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    assert "Programming Language :: Python :: 3.11" in metadata.get_all("Classifier")

    requires = metadata.get_all("Requires-Dist")
    core = {_requirement_name(r) for r in requires if "extra ==" not in r}
    assert {"torch", "lightning", "hydra-core", "omegaconf"} <= core
    assert "wandb" not in core
    assert {"wandb", "flash", "triton", "composer", "dev"} <= set(metadata.get_all("Provides-Extra"))
    for extra in ("wandb", "dev"):  # the dev extra runs the W&B tests
        assert any(_requirement_name(r) == "wandb" and f'extra == "{extra}"' in r for r in requires), extra


def test_the_installed_wheel_prints_help_and_config_and_trains_from_an_unrelated_folder(site, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "MPTLIKE_DATA": str(tmp_path / "data")}
    run = lambda *args, timeout=300: _ok(_run(args, cwd=work, env=env, timeout=timeout))

    # The wheel's mptlike ran, and read the config tree shipped inside it.
    where = run(sys.executable, "-c", "import mptlike; from mptlike.train.config import conf_dir; "
                                      "print(mptlike.__file__); print(conf_dir())").stdout.splitlines()
    assert Path(where[0]).resolve().is_relative_to(site.resolve()), where
    assert Path(where[1]).resolve() == (site / "mptlike" / "conf").resolve(), where

    out = run(site / "bin" / "mptlike-train", "--help").stdout  # the console script pip wrote
    assert "config groups" in out
    for group in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir()):
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"{group.name}=")), None)
        assert line is not None, (group.name, out)
        for option in group.glob("*.yaml"):
            assert option.stem in line, (option.stem, line)

    out = run(sys.executable, "-m", "mptlike.train", "--cfg", "optim.lr=0.01").stdout
    assert "lr: 0.01" in out and "run_dir: runs/quickstart" in out
    assert list(work.iterdir()) == []

    # A short run on a small jsonl corpus, tokenized by the wheel's mptlike-prep.
    sources = sorted(Path(json.__file__).parent.glob("*.py"))
    (work / "train.jsonl").write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in sources))
    (work / "val.jsonl").write_text(json.dumps({"text": Path(textwrap.__file__).read_text()}) + "\n")
    run(site / "bin" / "mptlike-prep", "train.jsonl", "--val", "val.jsonl", "--tokenizer", "bytes", "--out", "corpus")
    args = [
        "trainer=cpu", "model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.max_seq_len=32",
        "model.vocab_size=320", "data=folder", "data.path=corpus", "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "eval.every_n_steps=0", "eval.max_samples=4", "checkpoint.every_n_steps=0",
        "sample.max_new_tokens=0", "logger=csv", "run_dir=run",
    ]
    run(sys.executable, "-m", "mptlike.train", *args)

    run_dir = work / "run"
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [1, 2]
    assert any(r.get("val/loss") for r in rows)  # eval.at_end
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "step-0000002" / "COMPLETE").is_file()
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["corpus", "run", "train.jsonl", "val.jsonl"]  # no Hydra outputs/
