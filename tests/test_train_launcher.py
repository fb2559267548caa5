"""hydra/launcher=submitit_slurm / submitit_local: settings, the sbatch script SLURM would get, the per-node
command, and sweep jobs really run through submitit's local executor (no SLURM cluster here)."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_helpers import losses, make_corpus, tiny_args

from mptlike.errors import MptlikeError

pytest.importorskip("submitit")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

from mptlike.train.launcher import CLUSTER_ENV, TrainJob, make_executor, queue_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_launcher_settings_are_hydra_submitit_launchers_own_and_an_unknown_one_is_one_line():
    config = queue_config("submitit_slurm", {"partition": "gpu", "nodes": 2, "gpus_per_node": 8, "timeout_min": 30})
    assert (config["partition"], config["nodes"], config["gpus_per_node"], config["timeout_min"]) == ("gpu", 2, 8, 30)
    assert config["tasks_per_node"] == 1 and config["signal_delay_s"] == 120  # the plugin's defaults
    with pytest.raises(MptlikeError, match=r"hydra.launcher.gpus is not a setting of submitit_slurm: .*gpus_per_node"):
        queue_config("submitit_slurm", {"gpus": 8})
    with pytest.raises(MptlikeError, match="hydra.launcher: "):
        queue_config("submitit_local", {"nodes": "two"})
    with pytest.raises(MptlikeError, match="hydra/launcher=joblib is not a launcher mptlike offers"):
        queue_config("joblib", {})


def test_the_sbatch_script_asks_for_what_the_launcher_config_names(tmp_path, monkeypatch):
    # submitit's SLURM executor looks for srun before it builds anything; nothing is submitted here.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    config = queue_config("submitit_slurm", {"partition": "gpu", "nodes": 2, "gpus_per_node": 8, "timeout_min": 30,
                                             "account": "llm", "mem_gb": 512,
                                             "setup": ["module load cuda"]})
    executor = make_executor("submitit_slurm", config, folder=tmp_path / ".submitit", job_name="sweep")
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.M))
    assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "1" and sbatch["gpus-per-node"] == "8"
    assert sbatch["partition"] == "gpu" and sbatch["account"] == "llm" and sbatch["time"] == "30"
    assert sbatch["mem"] == "512GB" and sbatch["job-name"] == "sweep"
    assert sbatch["signal"] == "USR2@120"  # submitit's time-limit signal, handled by TrainJob.checkpoint
    assert str(tmp_path / ".submitit") in sbatch["output"]
    assert "module load cuda" in script


def test_a_multi_process_job_runs_torchrun_on_every_node_as_the_sbatch_script_does():
    env = SimpleNamespace(num_nodes=2, hostnames=["node007", "node008"], job_id="4242", node=1)
    job = TrainJob(("trainer.devices=8", "trainer.num_nodes=2", "run_dir=/shared/sweep/0"), processes_per_node=8)
    command = job.command(env)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node007:29500",
            "--rdzv-id=4242", "--max-restarts=3"} <= set(command)
    assert command[-5:] == ["-m", "mptlike.train", *job.overrides]
    one = SimpleNamespace(num_nodes=1, hostnames=["node007"], job_id="1", node=0)
    assert TrainJob(("optim.lr=1e-3",), processes_per_node=1).command(one)[1:] == ["-m", "mptlike.train",
                                                                                 "optim.lr=1e-3"]


def test_near_the_time_limit_a_job_stops_its_training_with_a_checkpoint_and_is_requeued(tmp_path):
    # What submitit does on USR2: call checkpoint() on the running job. A real training child gets SIGTERM,
    # writes its checkpoint and exits 3 (preempted); the job comes back as a resubmission of itself.
    import subprocess
    import sys
    import threading
    import time

    import submitit

    corpus = make_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    job = TrainJob(tuple(tiny_args(corpus, run_dir, "trainer.max_steps=100000", "eval.every_n_steps=0",
                                   "checkpoint.every_n_steps=0")), processes_per_node=1)
    job._child = subprocess.Popen([sys.executable, "-m", "mptlike.train", *job.overrides])
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.csv").is_file() or len(losses(run_dir)) < 2:
        assert time.monotonic() < deadline and job._child.poll() is None
        time.sleep(0.5)
    result = {}
    thread = threading.Thread(target=lambda: result.update(resubmit=job.checkpoint()))
    thread.start()
    thread.join(timeout=130)
    assert job._child.returncode == 3  # EXIT_PREEMPTED: stopped by the signal after a complete checkpoint
    step = max(losses(run_dir))
    assert (run_dir / "checkpoints" / f"step-{step:07d}" / "COMPLETE").is_file()
    resubmit = result["resubmit"]
    assert isinstance(resubmit, submitit.helpers.DelayedSubmission)
    assert resubmit.function.overrides == job.overrides and resubmit.function._child is None


def test_the_cluster_environment_is_launch_env_sh_s():
    text = (ROOT / "launch" / "env.sh").read_text()
    exported = dict(re.findall(r'^export (\w+)="\$\{\1:-([^}]*)\}"', text, flags=re.M))
    assert exported == CLUSTER_ENV


@pytest.mark.slow
def test_a_sweep_with_the_submitit_local_launcher_runs_each_job_through_submitit(tmp_path, capsys):
    from mptlike.train.cli import main

    corpus = make_corpus(tmp_path / "corpus")
    root = tmp_path / "sweep"
    args = tiny_args(corpus, root, "optim.lr=1e-3,3e-3", "trainer.max_steps=2", "eval.every_n_steps=0")
    assert main(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *args]) == 0
    for i, lr in enumerate(("0.001", "0.003")):
        assert sorted(losses(root / str(i))) == [1, 2]
        assert f"lr: {lr}" in (root / str(i) / "config.yaml").read_text()
    logs = list((root / ".submitit").glob("*/*_log.out"))  # submitit's own logs: the jobs ran through it
    assert len(logs) == 2
    manifest = (root / "multirun.yaml").read_text()
    assert manifest.count("status: succeeded") == 2
    assert "2 succeeded" in capsys.readouterr().out


def test_launcher_settings_without_a_sweep_or_for_the_basic_launcher_are_one_line(tmp_path, capsys):
    from mptlike.train.cli import main

    assert main(["hydra/launcher=submitit_slurm", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "add -m (--multirun)" in capsys.readouterr().err
    assert main(["-m", "hydra.launcher.nodes=2", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "the basic launcher" in capsys.readouterr().err
    assert main(["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "trainer.num_nodes=1",
                 f"run_dir={tmp_path / 'r'}"]) == 2
    assert "trainer.num_nodes=1 but hydra.launcher.nodes=2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
