"""One run, whichever backend trains it: the steps around the loop, written once.

    rank 0: lock run_dir (a second run there stops with one line)
    prepare the default corpus if it is missing (once per machine, under a file lock)
    stop early when the checkpoint already reached trainer.max_steps (and final/ was written)
    train: mptlike.train.loop.fit (Lightning Fabric) or the Composer backend; once its setup
      succeeded it calls on_start: delete old checkpoints when asked, write config.yaml, and arm
      the signals (before that a signal stops the run at once; after it, with a checkpoint)
    tear down the process group (after a barrier when training ended normally)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from mptlike.errors import MptlikeError, short_error
from mptlike.files import atomic_write
from mptlike.model import MPTForCausalLM
from mptlike.model.mpt import CONFIG_NAME
from mptlike.train.checkpoint import checkpoints_dir, set_aside_newer
from mptlike.train.layout import CONFIG, FINAL, LOCK, WANDB_ID
from mptlike.train.plan import RunPlan, check_data
from mptlike.train.redact import redact
from mptlike.train.result import RunResult
from mptlike.train.signals import Preemption

log = logging.getLogger(__name__)


def ensure_data(plan: RunPlan) -> RunPlan:
    """Prepare the default corpus once per machine; other processes wait on a file lock."""
    if plan.data is None or not plan.data.needs_prepare:
        return plan
    from mptlike.data.prep import prepare_default_corpus

    path = plan.data.path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "manifest.json").is_file():
            log.info("preparing the default corpus in %s (once; a minute or two)", path)
            prepare_default_corpus(path, vocab_size=plan.cfg.data.vocab_size)
    return dataclasses.replace(plan, data=check_data(plan.cfg, plan.model_config))


def write_config(plan: RunPlan) -> None:
    """run_dir/config.yaml: the resolved config this run used, credentials redacted."""
    from omegaconf import OmegaConf

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(plan.run_dir / CONFIG, OmegaConf.to_yaml(redact(plan.config_dict)))


def _log_start(plan: RunPlan) -> None:
    from mptlike.train.flops import FLOPS_FORMULA

    cfg, mc, world = plan.cfg, plan.model_config, plan.world
    with torch.device("meta"):
        model = MPTForCausalLM(mc)
    start = f"resuming {plan.resume_from} at step {plan.start_step}" if plan.resume_from else "starting fresh"
    log.info("%s: %s, run_dir %s, trainer.backend=%s", cfg.name, start, plan.run_dir, cfg.trainer.backend)
    log.info("model: %.2fM parameters, d_model %d, %d layers, seq %d; data %s",
             model.num_params() / 1e6, mc.d_model, mc.n_layers, mc.max_seq_len, plan.data.path)
    log.info("batch: %d sequences = %d micro x %d ranks x %d accumulation steps (%d tokens/step); %s",
             cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, world.world_size,
             plan.accumulation_steps, plan.tokens_per_step, plan.precision.name)
    log.info("MFU: %.3g FLOPs/token (%s)", model.flops_per_token(mc.max_seq_len), FLOPS_FORMULA)
    log.info("attention: model.attn_impl=%s -> %s", cfg.model.attn_impl, mc.attn_impl)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on run_dir for the whole run, so a second run there stops with one line.

    flock(2): the kernel drops it when the process dies, however it dies, so a killed run never
    leaves it stuck; on NFS (v4, or v3 with lockd) Linux implements it with the server's byte-range
    locks, and on Lustre with the `flock` mount option, so it holds across the nodes of a cluster.
    """
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise MptlikeError(f"run_dir={run_dir} cannot be written ({short_error(exc)}): give a folder you can "
                           f"write to, e.g. run_dir=runs/my-run") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise MptlikeError(f"run_dir={run_dir} is in use by another run ({holder}): wait for it to end, or "
                               f"give this run another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def start_run_dir(plan: RunPlan) -> None:
    """The run has really started (model built, data opened, checkpoint loaded): only now does it
    change run_dir, deleting old checkpoints when asked and writing config.yaml. Rank 0; each backend
    calls it once its setup succeeded, so a run that fails at start leaves run_dir as it was."""
    if plan.world.rank != 0:
        return
    old = checkpoints_dir(plan.run_dir)
    if str(plan.cfg.resume) == "never" and plan.cfg.checkpoint.overwrite:
        if old.exists():
            log.warning("checkpoint.overwrite=true: deleting %s", old)
            shutil.rmtree(old)
        # A new run gets a new W&B run, not more steps appended to the old one's history.
        (plan.run_dir / WANDB_ID).unlink(missing_ok=True)
    if plan.resume_from is not None and str(plan.cfg.trainer.backend) == "lightning":
        set_aside_newer(plan.run_dir, plan.start_step)
    write_config(plan)


def _teardown(*, clean: bool) -> None:
    if dist.is_available() and dist.is_initialized():
        if clean:
            # Without this barrier a fast rank can tear down the process group while a slow one talks.
            dist.barrier()
        dist.destroy_process_group()


def run(plan: RunPlan) -> RunResult:
    cfg = plan.cfg
    rank_zero = plan.world.rank == 0
    # The signals are ours from here to the end of teardown (see mptlike.train.signals); the
    # process's own handlers come back when run() returns.
    with Preemption() as preemption, run_dir_lock(plan.run_dir) if rank_zero else contextlib.nullcontext():
        plan = ensure_data(plan)
        composer = str(cfg.trainer.backend) == "composer"
        export_missing = cfg.checkpoint.export_final and not (plan.run_dir / FINAL / CONFIG_NAME).is_file()
        if plan.start_step >= cfg.trainer.max_steps and (composer or not export_missing):
            log.info("%s already reached trainer.max_steps=%d: nothing to train", plan.resume_from,
                     cfg.trainer.max_steps)
            return RunResult(final_step=plan.start_step, is_rank_zero=rank_zero)
        if rank_zero:
            _log_start(plan)
        if composer:
            # Composer is optional and lives in its own environment (torch 2.6-2.7): imported only here.
            from mptlike.integrations.composer.backend import fit
        else:
            # Also when the steps are done but final/ is missing (a full disk during the export):
            # the loop then trains nothing and writes the export.
            from mptlike.train.loop import fit

        def on_start() -> None:
            start_run_dir(plan)
            preemption.arm()

        try:
            result = fit(plan, on_start=on_start, preemption=preemption)
        except BaseException:
            _teardown(clean=False)
            raise
        _teardown(clean=True)
        return result
