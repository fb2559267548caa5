"""One run, whichever backend trains it: the steps around the loop, written once.

    prepare the default corpus if it is missing (once per machine, under a file lock)
    rank 0: delete old checkpoints when asked (resume=never checkpoint.overwrite=true), write config.yaml
    stop early when the checkpoint already reached trainer.max_steps
    train: mptlike.train.loop.fit (Lightning Fabric) or the Composer backend
    tear down the process group (after a barrier when training ended normally)
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import shutil
import sys

import torch
import torch.distributed as dist

from mptlike.files import atomic_write
from mptlike.model import MPTForCausalLM
from mptlike.train.checkpoint import checkpoints_dir
from mptlike.train.layout import CONFIG
from mptlike.train.plan import RunPlan, check_data
from mptlike.train.redact import redact
from mptlike.train.result import RunResult

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


def run(plan: RunPlan) -> RunResult:
    cfg = plan.cfg
    rank_zero = plan.world.rank == 0
    plan = ensure_data(plan)
    if rank_zero:
        old = checkpoints_dir(plan.run_dir)
        if str(cfg.resume) == "never" and cfg.checkpoint.overwrite and old.exists():
            log.warning("checkpoint.overwrite=true: deleting %s", old)
            shutil.rmtree(old)
        write_config(plan)
    if plan.start_step >= cfg.trainer.max_steps:
        log.info("%s already reached trainer.max_steps=%d: nothing to train", plan.resume_from, cfg.trainer.max_steps)
        return RunResult(final_step=plan.start_step, is_rank_zero=rank_zero)
    if rank_zero:
        _log_start(plan)
    if str(cfg.trainer.backend) == "composer":
        # Composer is optional and lives in its own environment (torch 2.6-2.7): imported only here.
        from mptlike.integrations.composer.backend import fit
    else:
        from mptlike.train.loop import fit
    try:
        return fit(plan)
    finally:
        if dist.is_available() and dist.is_initialized():
            if sys.exc_info()[0] is None:
                # Without this barrier a fast rank can tear down the process group while a slow one talks.
                dist.barrier()
            dist.destroy_process_group()
