"""Hydra as its users know it: -m sweeps, --config-dir / --config-name / hydra.searchpath, ~KEY, and
Hydra's other flags and hydra.* keys either honoured or refused with one line (exit 2), never ignored."""

import fcntl
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from train_helpers import make_corpus, tiny_args

from mptlike.train.cli import main
from mptlike.train.config import compose_config, to_train_config

# Two steps per job, no periodic checkpoint or evaluation: a job trains in about a second on a CPU.
FAST = ["trainer.max_steps=2", "eval.every_n_steps=0", "checkpoint.every_n_steps=0", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data") / "json")


def sweep_args(corpus, root, *extra):
    return [*tiny_args(corpus, root), *FAST, *extra]


def run(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mptlike-train: error: ") and "Traceback" not in err
    return lines[0]


def saved(run_dir):
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def manifest(root):
    return yaml.safe_load((root / "multirun.yaml").read_text())


# --- sweeps -----------------------------------------------------------------------------------------


def test_a_2x2_sweep_runs_four_jobs_into_four_folders_with_the_swept_values(capsys, tmp_path, corpus):
    root = tmp_path / "sweep"
    code, out, err = run(capsys, ["-m", *sweep_args(corpus, root, "optim.lr=1e-3,3e-4", "model.n_layers=1,2")])
    assert code == 0, err
    # The cartesian product in Hydra's order: each key at its first place on the command line
    # (model.n_layers is in tiny_args before optim.lr), the last one changing fastest.
    expected = [(1, 1e-3), (1, 3e-4), (2, 1e-3), (2, 3e-4)]
    assert sorted(p.name for p in root.iterdir()) == ["0", "1", "2", "3", "multirun.yaml"]
    for number, (layers, lr) in enumerate(expected):
        config = saved(root / str(number))
        assert (config["model"]["n_layers"], config["optim"]["lr"]) == (layers, lr)
        assert config["run_dir"] == str(root / str(number))
        assert (root / str(number) / "metrics.csv").is_file()
    jobs = manifest(root)["jobs"]
    assert [(j["job"], j["status"], j["exit_code"]) for j in jobs] == [(n, "succeeded", 0) for n in range(4)]
    assert jobs[2]["swept"] == ["model.n_layers=2", "optim.lr=0.001"]
    assert "optim.lr=0.001" in jobs[2]["overrides"] and jobs[2]["run_dir"] == str(root / "2")
    assert f"sweep of 4 jobs in {root}: 4 succeeded" in out


def test_a_bad_value_in_a_later_job_fails_before_the_first_trains_and_writes_nothing(capsys, tmp_path, corpus):
    root = tmp_path / "sweep"
    code, out, err = run(capsys, ["-m", *sweep_args(corpus, root, "model.n_heads=4,2,3")])
    assert code == 2
    line = one_error_line(err)
    assert line.startswith("mptlike-train: error: job 2 (model.n_heads=3): ")
    assert "model.d_model=64 is not divisible by model.n_heads=3" in line
    assert not root.exists() and out == ""


def test_multirun_without_a_sweep_runs_one_job_in_folder_0(capsys, tmp_path, corpus):
    root = tmp_path / "sweep"
    code, out, err = run(capsys, ["--multirun", *sweep_args(corpus, root)])
    assert code == 0, err
    assert sorted(p.name for p in root.iterdir()) == ["0", "multirun.yaml"]
    assert saved(root / "0")["trainer"]["max_steps"] == 2
    assert [(j["job"], j["swept"], j["status"]) for j in manifest(root)["jobs"]] == [(0, [], "succeeded")]


def test_the_default_sweep_root_is_runs_multirun_date_time(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, ["-m", "--cfg", "seed=1,2"])
    assert code == 0
    run_dirs = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("run_dir: ")]
    assert len(run_dirs) == 2 and run_dirs[0].startswith("runs/multirun/") and run_dirs[0].endswith("/0")
    assert run_dirs[1] == run_dirs[0][:-1] + "1"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_job_does_not_stop_the_sweep_and_gives_the_sweep_its_exit_code(capsys, tmp_path, corpus):
    root = tmp_path / "sweep"
    (root / "0").mkdir(parents=True)
    with open(root / "0" / ".lock", "w") as held:  # another run holds job 0's folder
        fcntl.flock(held, fcntl.LOCK_EX)
        code, out, err = run(capsys, ["-m", *sweep_args(corpus, root, "seed=1,2")])
    assert code == 2
    assert f"mptlike-train: error: job 0 (seed=1): run_dir={root / '0'} is in use by another run" in err
    jobs = manifest(root)["jobs"]
    assert [(j["status"], j["exit_code"]) for j in jobs] == [("failed", 2), ("succeeded", 0)]
    assert saved(root / "1")["seed"] == 2 and not (root / "0" / "config.yaml").exists()
    assert "1 failed, 1 succeeded" in out


def test_a_preempted_job_stops_the_sweep_and_the_same_command_goes_on(tmp_path, corpus):
    root = tmp_path / "sweep"
    command = [sys.executable, "-m", "mptlike.train", "-m", *sweep_args(corpus, root, "seed=1,2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPTLIKE_FAULTS": "signal_at_step=1,signal=TERM"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"the sweep stopped at job 0 (preempted); run the same command with run_dir={root}" in proc.stderr
    jobs = manifest(root)["jobs"]
    assert [(j["status"], j["exit_code"]) for j in jobs] == [("preempted", 3), ("pending", None)]
    assert not (root / "1").exists()

    env["MPTLIKE_FAULTS"] = ""
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [j["status"] for j in manifest(root)["jobs"]] == ["succeeded", "succeeded"]
    assert "resuming" in proc.stderr and saved(root / "1")["seed"] == 2


def test_a_sweep_without_multirun_is_one_line_that_names_m(capsys, tmp_path):
    code, _, err = run(capsys, [f"run_dir={tmp_path / 'run'}", "optim.lr=1e-3,3e-4"])
    assert code == 2
    line = one_error_line(err)
    assert "optim.lr=1e-3,3e-4 sweeps optim.lr over several values: add -m (--multirun)" in line
    assert "optim.lr=[a,b]" in line and list(tmp_path.iterdir()) == []


def test_multirun_is_refused_under_torchrun(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run(capsys, ["-m", f"run_dir={tmp_path / 'sweep'}", "seed=1,2"])
    assert code == 2
    assert "-m/--multirun under torchrun (WORLD_SIZE=2)" in one_error_line(err)
    assert "one torchrun per job" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [["--cfg"], ["--dry-run"], ["--estimate-memory"]])
def test_cfg_dry_run_and_memory_estimate_print_each_job_and_write_nothing(capsys, tmp_path, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, ["-m", *flags, "run_dir=sweep", "model=glob(mpt-1*)"])
    assert code == 0, err
    headers = [line for line in out.splitlines() if line.startswith("# job ")]
    assert headers == ["# job 0 (model=mpt-125m)", "# job 1 (model=mpt-13b)", "# job 2 (model=mpt-1b)"]
    assert list(tmp_path.iterdir()) == []


def test_run_dir_is_the_sweep_root_and_cannot_be_swept(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, ["-m", "--cfg", "run_dir=runs/${name}-sweep", "name=lr", "seed=1,2"])
    assert code == 0
    assert "run_dir: runs/lr-sweep/0" in out and "run_dir: runs/lr-sweep/1" in out
    code, _, err = run(capsys, ["-m", "--cfg", "run_dir=runs/${name}", "name=a,b"])
    assert code == 2 and "puts the jobs under different sweep roots" in one_error_line(err)
    code, _, err = run(capsys, ["-m", "--cfg", "run_dir=a,b"])
    assert code == 2 and "run_dir is the sweep root (job N runs in run_dir/N) and cannot be swept" in err


def test_an_interval_sweep_is_refused(capsys):
    code, _, err = run(capsys, ["-m", "--cfg", "optim.lr=interval(1e-4,1e-3)"])
    assert code == 2 and "an interval() needs a sweeper plugin" in one_error_line(err)


# --- hydra.* keys and Hydra's flags -------------------------------------------------------------------


def test_hydra_run_dir_and_sweep_dir_are_run_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, ["--cfg", "hydra.run.dir=runs/one"])
    assert code == 0 and "run_dir: runs/one\n" in out
    code, out, _ = run(capsys, ["-m", "--cfg", "hydra.sweep.dir=runs/many", "seed=1,2"])
    assert code == 0 and "run_dir: runs/many/0\n" in out and "run_dir: runs/many/1\n" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, words",
    [
        (["hydra.sweep.dir=x"], "hydra.sweep.dir is the root folder of a sweep (-m/--multirun)"),
        (["-m", "hydra.run.dir=x"], "give the root as run_dir= (or hydra.sweep.dir=)"),
        (["hydra.job.chdir=true"], "honours only hydra.searchpath=[...], hydra.run.dir="),
        (["hydra/launcher=joblib"], "not a launcher mptlike offers: use one of basic, submitit_slurm, submitit_local"),
        (["+hydra.verbose=true"], "has no Hydra job runtime"),
        (["--info"], "`--cfg` prints the composed config and `--help`"),
        (["--info", "defaults"], "`--cfg` prints the composed config and `--help`"),
        (["--hydra-help"], "`--help` describes every option"),
        (["--shell-completion", "install=bash"], "shell completion is not offered: `--help`"),
        (["-sc", "install=bash"], "shell completion is not offered: `--help`"),
        (["--config-path", "/x"], "add a folder of yours with --config-dir DIR"),
        (["-cp", "/x"], "add a folder of yours with --config-dir DIR"),
        (["--cfg", "hydra"], "--cfg (or --cfg job) prints the training config"),
        (["--config-dir", "/no/such/folder"], "--config-dir /no/such/folder: no such folder"),
        (["-cd"], "-cd needs a value: --config-dir DIR"),
        (["hydra.searchpath=[/no/such/folder]"], "the folder /no/such/folder does not exist"),
        (["hydra.searchpath=[pkg://no_such_package.conf]"], "hydra.searchpath entry pkg://no_such_package.conf"),
    ],
)
def test_hydra_options_it_does_not_offer_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, [*args, "run_dir=r"] if "-cd" not in args else args)
    assert code == 2
    assert words in one_error_line(err)
    assert out == "" and list(tmp_path.iterdir()) == []


def test_cfg_job_and_resolve_are_hydras_spelling_of_cfg(capsys):
    code, out, _ = run(capsys, ["--cfg", "job", "--resolve", "optim.lr=0.01"])
    assert code == 0 and "lr: 0.01" in out


# --- a user's own configs -----------------------------------------------------------------------------


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def user_conf(tmp_path):
    conf = tmp_path / "my-conf"
    write(conf / "model" / "partial.yaml", "d_model: 256\nn_layers: 4\n")
    write(conf / "model" / "four-heads.yaml", "d_model: 128\nn_heads: 4\nn_layers: 3\n")
    write(conf / "model" / "deeper-125m.yaml", "defaults:\n  - mpt-125m\nn_layers: 6\n")
    write(conf / "experiment" / "mine.yaml", """\
        # @package _global_
        defaults:
          - override /model: four-heads
          - override /optim: lionw
        name: mine
        optim:
          lr: 1.0e-4
        """)
    write(conf / "my-run.yaml", "defaults:\n  - config\n  - _self_\nname: my-run\nseed: 5\n")
    write(conf / "bare.yaml", "name: bare\n")
    return conf


def model_of(overrides, **where):
    return to_train_config(compose_config(overrides, **where)).model


def test_a_partial_model_file_takes_mpt_tiny_for_the_keys_it_leaves_out(user_conf):
    model = model_of(["model=partial", "~experiment"], config_dir=user_conf)
    tiny = model_of(["model=mpt-tiny", "~experiment"])
    assert (model.d_model, model.n_layers) == (256, 4)
    assert {k: v for k, v in vars(model).items() if k not in ("d_model", "n_layers")} == {
        k: v for k, v in vars(tiny).items() if k not in ("d_model", "n_layers")
    }
    # kv_n_heads stays null until validation, so a file with other heads is multi-head attention.
    model = model_of(["model=four-heads"], config_dir=user_conf)
    assert (model.d_model, model.n_heads, model.kv_n_heads, model.n_layers) == (128, 4, 4, 3)
    model = model_of(["model=deeper-125m"], config_dir=user_conf)  # `defaults: [mpt-125m]` builds on a preset
    assert (model.d_model, model.n_heads, model.n_layers, model.vocab_size) == (768, 12, 6, 50368)


def test_config_dir_adds_groups_options_and_experiments_beside_ours(capsys, tmp_path, user_conf, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, ["--cfg", f"--config-dir={user_conf}", "experiment=mine", "trainer=cpu"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert (cfg["name"], cfg["model"]["d_model"], cfg["optim"]["name"], cfg["optim"]["lr"]) == (
        "mine", 128, "decoupled_lionw", 1e-4)
    assert cfg["trainer"]["accelerator"] == "cpu"  # our groups still work
    code, out, _ = run(capsys, ["--help", "-cd", str(user_conf)])
    assert code == 0 and "deeper-125m" in out and "mine" in out and "mpt-70b" in out
    code, _, err = run(capsys, ["--cfg", "-cd", str(user_conf), "model=nope"])
    assert code == 2 and "model=nope is not a known option" in err and "four-heads" in one_error_line(err)


def test_config_dir_is_searched_before_ours(tmp_path):
    conf = tmp_path / "my-conf"
    write(conf / "model" / "mpt-tiny.yaml", "d_model: 128\n")
    assert model_of([], config_dir=conf).d_model == 128
    assert model_of([]).d_model == 256


def test_config_name_picks_a_primary_config_that_builds_on_ours(capsys, tmp_path, user_conf, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, ["--cfg", "-cd", str(user_conf), "-cn", "my-run", "model=partial"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert (cfg["name"], cfg["seed"], cfg["run_dir"], cfg["model"]["d_model"]) == ("my-run", 5, "runs/my-run", 256)
    assert cfg["trainer"]["max_steps"] == 100  # the quickstart experiment, from our config.yaml
    code, _, err = run(capsys, ["--cfg", "-cd", str(user_conf), "--config-name", "bare"])
    assert code == 2 and "the primary config 'bare' does not build on mptlike's schema" in one_error_line(err)
    code, _, err = run(capsys, ["--cfg", "-cd", str(user_conf), "-cn", "missing"])
    assert code == 2 and f"--config-name missing: there is no missing.yaml in --config-dir {user_conf}" in err


def test_hydra_searchpath_finds_a_users_configs_after_ours(tmp_path, user_conf):
    for override in (f"hydra.searchpath=[file://{user_conf}]", f"+hydra.searchpath=[{user_conf}]"):
        assert model_of(["model=four-heads", override]).d_model == 128
    write(user_conf / "model" / "mpt-tiny.yaml", "d_model: 128\n")
    assert model_of([f"hydra.searchpath=[{user_conf}]"]).d_model == 256  # ours first, as Hydra appends
    assert to_train_config(compose_config([f"hydra.searchpath=[{user_conf}]"], config_name="my-run")).seed == 5


def test_a_sweep_over_a_users_models_trains_each(capsys, tmp_path, corpus, user_conf):
    root = tmp_path / "sweep"
    args = [a for a in sweep_args(corpus, root) if not a.startswith(("model.d_model", "model.n_heads", "model.n_l"))]
    code, _, err = run(capsys, ["-m", "-cd", str(user_conf), *args, "model=four-heads,mpt-tiny", "model.d_model=64"])
    assert code == 0, err
    assert saved(root / "0")["model"]["n_heads"] == 4 and saved(root / "0")["model"]["n_layers"] == 3
    assert saved(root / "1")["model"]["n_heads"] == 8 and saved(root / "1")["model"]["n_layers"] == 4


# --- ~KEY -----------------------------------------------------------------------------------------------


def test_deleting_a_key_resets_it_to_the_schema_default():
    cfg = to_train_config(compose_config(["~optim.lr"]))  # quickstart sets 3e-3; the schema says 6e-4
    assert cfg.optim.lr == 6e-4 and cfg.optim.warmup_steps == 10
    assert to_train_config(compose_config(["~optim.lr", "optim.lr=0.5"])).optim.lr == 0.5  # in order
    assert to_train_config(compose_config(["optim.lr=0.5", "~optim.lr"])).optim.lr == 6e-4
    assert to_train_config(compose_config(["~optim.lr=0.003"])).optim.lr == 6e-4
    cfg = to_train_config(compose_config(["parallel.ac_every=4", "~parallel", "parallel.compile=true"]))
    assert (cfg.parallel.ac_every, cfg.parallel.compile) == (2, True)
    assert to_train_config(compose_config(["~run_dir", "name=x"])).run_dir == "runs/x"


def test_deleting_a_group_drops_its_option_and_a_model_then_is_mpt_tinys():
    cfg = to_train_config(compose_config(["~model", "model.n_heads=4"]))
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.kv_n_heads) == (256, 4, 4)
    cfg = to_train_config(compose_config(["~experiment"]))
    assert (cfg.trainer.max_steps, cfg.optim.lr) == (1000, 6e-4)


@pytest.mark.parametrize(
    "override, words",
    [
        ("~optim.lr=0.5", "~optim.lr=0.5: optim.lr is 0.003, not 0.5, so it is kept"),
        ("~optim.learning_rate", "unknown config key 'optim.learning_rate' (from ~optim.learning_rate)"),
        ("~model=mpt-125m", "~model=mpt-125m removes nothing: model is not that option here"),
    ],
)
def test_a_delete_that_cannot_apply_is_one_line(capsys, tmp_path, override, words):
    code, _, err = run(capsys, [f"run_dir={tmp_path / 'run'}", override])
    assert code == 2 and words in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override", [
    'data.storage_options={endpoint_url: "http://minio:9000", key: AKIA0, secret: s3cr3t}',
    "data.storage_options.endpoint_url=http://minio:9000",
    "+data.storage_options.endpoint_url=http://minio:9000",
])
def test_storage_options_take_the_users_own_keys_without_hydras_plus(override):
    # fsspec's options are the user's names, which a structured config cannot list: plain KEY=VALUE must work.
    cfg = to_train_config(compose_config(["data=folder", "data.path=s3://bucket/prefix", override]))
    assert cfg.data.storage_options["endpoint_url"] == "http://minio:9000"
    assert compose_config(["data=folder", "data.path=s3://b/p"]).data.storage_options == {}


def test_cfg_redacts_credentials_given_as_storage_options(capsys):
    assert main(["data=folder", "data.path=s3://bucket/prefix",
                 'data.storage_options={endpoint_url: "http://minio:9000", key: AKIA0, secret: s3cr3t}', "--cfg"]) == 0
    out = capsys.readouterr().out
    options = yaml.safe_load(out)["data"]["storage_options"]
    assert options == {"endpoint_url": "http://minio:9000", "key": "<redacted>", "secret": "<redacted>"}
    assert "s3cr3t" not in out and "AKIA0" not in out
