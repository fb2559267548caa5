"""`hydra/launcher=submitit_slurm` (or `submitit_local`): a sweep's jobs go to SLURM through submitit.

    mptlike-train -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.nodes=2 \
        hydra.launcher.gpus_per_node=8 trainer.devices=8 trainer.num_nodes=2 optim.lr=1e-4,3e-4

The launcher's settings are hydra-submitit-launcher's own (its SlurmQueueConf / LocalQueueConf:
timeout_min, nodes, gpus_per_node, cpus_per_task, mem_gb, partition, qos, account, constraint,
additional_parameters, setup, ...), set with `hydra.launcher.KEY=VALUE` as its users do; an unknown key
is one line. Each job is one SLURM job (an array of them) with one task per node, as launch/slurm.sbatch
runs: a job of one process trains in that task; a job of several (trainer.devices x trainer.num_nodes > 1)
starts torchrun on every node, with the first node of the allocation hosting the c10d rendezvous and
the environment launch/env.sh sets. Before the time limit, each job checkpoints and is requeued
(TrainJob.checkpoint). submitit's own folder (its sbatch scripts, logs and pickles) is
SWEEP_ROOT/.submitit/JOB_ID. The command returns once every job has ended; its exit code is the sweep's.

Not tried on a real SLURM cluster here: the tests run the jobs with submitit's local executor and check
the sbatch script and the per-node command that SLURM would get.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mptlike.errors import MptlikeError

LAUNCHERS = ("basic", "submitit_slurm", "submitit_local")
INSTALL_HINT = "pip install 'mptlike[submitit]'"
RDZV_PORT = 29500
# The defaults launch/env.sh exports for multi-GPU jobs (a value already in the environment wins);
# tests/test_train_launcher.py keeps the two lists equal.
CLUSTER_ENV = {
    "OMP_NUM_THREADS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "270",
}


def split_launcher(overrides: Sequence[str]) -> tuple[str, dict[str, Any], list[str]]:
    """(`hydra/launcher=` choice, `hydra.launcher.KEY=VALUE` settings, the other overrides); basic when unset."""
    import yaml

    name, settings, rest = "basic", {}, []
    for text in overrides:
        key, sep, value = text.partition("=")
        if key == "hydra/launcher" and sep:
            name = value
        elif key.startswith("hydra.launcher.") and sep:
            try:
                settings[key.removeprefix("hydra.launcher.")] = yaml.safe_load(value) if value else None
            except yaml.YAMLError:
                raise MptlikeError(f"{text}: the value does not parse (a number, a string, a [list] or a "
                                   f"{{key: value}} map)") from None
        else:
            rest.append(text)
    if name not in LAUNCHERS:
        raise MptlikeError(f"hydra/launcher={name} is not a launcher mptlike offers: use one of {', '.join(LAUNCHERS)}")
    if settings and name == "basic":
        raise MptlikeError(f"hydra.launcher.{next(iter(settings))}: the basic launcher (jobs one after another in "
                           f"this process) has no settings; choose hydra/launcher=submitit_slurm or submitit_local")
    return name, settings, rest


def queue_config(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """hydra-submitit-launcher's config for `name` with the `hydra.launcher.*` settings applied, checked."""
    if name not in LAUNCHERS[1:]:
        raise MptlikeError(f"hydra/launcher={name} is not a launcher mptlike offers: use one of {', '.join(LAUNCHERS)}")
    try:
        from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        raise MptlikeError(f"hydra/launcher={name} needs hydra-submitit-launcher, which is not installed here: "
                           f"{INSTALL_HINT}") from None
    schema = OmegaConf.structured(SlurmQueueConf if name == "submitit_slurm" else LocalQueueConf)
    known = [k for k in schema if not k.startswith("_")]
    for key in settings:
        if key not in known:
            raise MptlikeError(f"hydra.launcher.{key} is not a setting of {name}: use one of {', '.join(known)}")
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(settings))
    except OmegaConfBaseException as exc:
        raise MptlikeError(f"hydra.launcher: {str(exc).splitlines()[0]}") from None
    # submitit_folder and name default to Hydra's job runtime (${hydra.sweep.dir}, ${hydra.job.name}), which we
    # have not: ROOT/.submitit/%j and the experiment's name, unless given.
    values = {k: merged[k] for k in known if k not in ("submitit_folder", "name") or k in settings}
    return {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in values.items()}


def make_executor(name: str, config: dict[str, Any], *, folder: Path, job_name: str) -> Any:
    """A submitit executor with the launcher's parameters, as hydra-submitit-launcher builds it."""
    import submitit

    cluster = "slurm" if name == "submitit_slurm" else "local"
    config = dict(config)
    init = {"folder": str(config.pop("submitit_folder", None) or folder / "%j")}
    job_name = config.pop("name", None) or job_name
    if "max_num_timeout" in config:
        init[f"{cluster}_max_num_timeout"] = config["max_num_timeout"]
    executor = submitit.AutoExecutor(cluster=cluster, **init)
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
            "stderr_to_stdout"}
    params = {k if k in base else f"{cluster}_{k}": v for k, v in config.items() if k != "max_num_timeout"}
    executor.update_parameters(name=job_name, **params)
    return executor


class TrainJob:
    """One sweep job as a submitit task: `mptlike-train OVERRIDES` on each node of its allocation.

    The training runs in a child process (torchrun for a multi-process job), so that when SLURM's time
    limit nears, submitit's signal (USR2, `signal_delay_s` ahead) reaches `checkpoint()` here: it sends
    SIGTERM to the child (torchrun forwards it to every rank), which finishes its step, writes a complete
    checkpoint and exits 3; then submitit requeues the job, and the next allocation resumes from that
    checkpoint (resume=auto), as launch/slurm.sbatch does.
    """

    def __init__(self, overrides: Sequence[str], processes_per_node: int, max_restarts: int = 3,
                 stop_timeout_s: float = 110.0) -> None:
        self.overrides = tuple(overrides)
        self.processes_per_node = processes_per_node
        self.max_restarts = max_restarts
        self.stop_timeout_s = stop_timeout_s  # within hydra-submitit-launcher's signal_delay_s (120)
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_child": None}  # pickled for the cluster: no process handle

    def command(self, env: Any) -> list[str]:
        """The per-node command; `env` is submitit's JobEnvironment (hostnames, num_nodes, job_id)."""
        if env.num_nodes * self.processes_per_node == 1:
            return [sys.executable, "-m", "mptlike.train", *self.overrides]
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={env.num_nodes}", f"--nproc_per_node={self.processes_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={env.hostnames[0]}:{RDZV_PORT}", f"--rdzv-id={env.job_id}",
            f"--max-restarts={self.max_restarts}",
            "-m", "mptlike.train", *self.overrides,
        ]

    def __call__(self) -> int:
        import submitit

        command = self.command(submitit.JobEnvironment())
        env = {**CLUSTER_ENV, **os.environ} if command[2] == "torch.distributed.run" else dict(os.environ)
        self._child = subprocess.Popen(command, env=env)
        return self._child.wait()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's time-limit hook: stop the training with a checkpoint, then requeue this job."""
        import submitit

        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass  # the time limit ends it; the next allocation resumes from the newest complete checkpoint
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.overrides, self.processes_per_node, self.max_restarts, self.stop_timeout_s))


def submit_sweep(name: str, settings: dict[str, Any], jobs: Sequence[Sequence[str]], *, root: Path,
                 job_name: str, processes_per_node: Sequence[int]) -> list[int]:
    """Submit every job (its overrides already carry run_dir=ROOT/N) and wait; their exit codes, in order."""
    config = queue_config(name, settings)
    executor = make_executor(name, config, folder=root / ".submitit", job_name=job_name)
    tasks = [TrainJob(tuple(overrides), devices) for overrides, devices in zip(jobs, processes_per_node)]
    submitted = executor.submit_array(tasks) if len(tasks) > 1 else [executor.submit(tasks[0])]
    codes = []
    for job in submitted:
        try:
            result = job.results()  # one result per task of the job (one task per node)
            codes.append(max(int(r) for r in result))
        except Exception as exc:  # a job that died, was cancelled or timed out: submitit says which
            print(f"mptlike-train: job {job.job_id} failed: {str(exc).strip().splitlines()[-1][:300]}; its output "
                  f"is in {job.paths.stdout}", file=sys.stderr)
            codes.append(1)
    return codes
