"""From a validated RunPlan to a finished run: data, run folder, Lightning Trainer, fit."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mptlike.model import MPTForCausalLM
from mptlike.train.checkpoint import checkpoints_dir
from mptlike.train.plan import RunPlan, check_data
from mptlike.train.redact import redact

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


@dataclass
class RunResult:
    steps_run: int
    final_step: int
    wall_seconds: float
    first_loss: float | None
    last_loss: float | None
    val: dict[str, float]
    export_dir: Path | None
    sample: str | None
    is_rank_zero: bool


def ensure_data(plan: RunPlan) -> None:
    """Prepare the default corpus once per machine; other processes wait on a file lock."""
    if plan.data is None or not plan.data.needs_prepare:
        return
    from mptlike.data.prep import prepare_default_corpus

    path = plan.data.path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "manifest.json").is_file():
            log.info("preparing the default corpus in %s (once; a minute or two)", path)
            prepare_default_corpus(path, vocab_size=plan.cfg.data.vocab_size)
    plan.data = check_data(plan.cfg, plan.model_config)


def write_config(plan: RunPlan) -> None:
    """run_dir/config.yaml: the resolved config this run used (rank 0, atomically)."""
    from omegaconf import OmegaConf

    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(OmegaConf.to_yaml(redact(plan.config_dict)))
    os.replace(tmp, run_dir / CONFIG_FILE)


def _quiet_lightning() -> None:
    # Lightning sets its loggers to INFO on import (device banners, tips); keep warnings only.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _build_trainer(plan: RunPlan, module, callbacks, loggers):
    import lightning.pytorch as pl

    _quiet_lightning()

    plugins = None
    strategy = "auto"
    if plan.world.world_size > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=plan.world.world_size, tensor_parallel_size=1)
    if plan.world.external:
        # Under torchrun (also inside SLURM), torchrun's ranks are the truth, not SLURM's tasks.
        from lightning.fabric.plugins.environments import TorchElasticEnvironment

        plugins = [TorchElasticEnvironment()]
    return pl.Trainer(
        accelerator=plan.accelerator,
        devices=plan.world.devices,
        num_nodes=plan.world.num_nodes,
        strategy=strategy,
        precision=plan.precision.lightning,
        plugins=plugins,
        max_epochs=1,
        max_steps=-1,
        logger=loggers or False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        default_root_dir=str(plan.run_dir),
    )


def _finish_loggers(loggers, is_rank_zero: bool) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and is_rank_zero and logger._experiment is not None:
            import wandb

            # Lightning leaves the W&B run open. finish() ends it; teardown() stops W&B's service
            # process, which is what flushes an offline run's .wandb file to disk completely.
            logger.experiment.finish()
            wandb.teardown()


def _log_start(plan: RunPlan, flops_per_token: int, peak: float | None) -> None:
    from mptlike.train.flops import FLOPS_FORMULA

    cfg, mc, world = plan.cfg, plan.model_config, plan.world
    with torch.device("meta"):
        params = MPTForCausalLM(mc).num_params()
    start = f"resuming {plan.resume_from} at step {plan.start_step}" if plan.resume_from else "starting fresh"
    log.info("%s: %s, run_dir %s", cfg.name, start, plan.run_dir)
    log.info("model: %.2fM parameters, d_model %d, %d layers, seq %d; data %s",
             params / 1e6, mc.d_model, mc.n_layers, mc.max_seq_len, plan.data.path)
    log.info("batch: %d sequences = %d micro x %d ranks x %d accumulation steps (%d tokens/step); %s",
             cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, world.world_size,
             plan.accumulation_steps, plan.tokens_per_step, plan.precision.name)
    peak_text = f"{peak:.3g} FLOP/s peak" if peak else "no peak known (set trainer.peak_flops for MFU)"
    log.info("MFU: %.3g FLOPs/token (%s), %s", flops_per_token, FLOPS_FORMULA, peak_text)


def run(plan: RunPlan) -> RunResult:
    from mptlike.train.callbacks import ProgressDisplay, ThroughputMonitor
    from mptlike.train.flops import peak_flops
    from mptlike.train.loggers import build_loggers
    from mptlike.train.module import MPTTrainingModule

    cfg = plan.cfg
    if cfg.trainer.backend == "composer":
        from mptlike.train import composer_runner

        return composer_runner.run(plan)
    rank_zero = plan.world.rank == 0
    ensure_data(plan)
    if rank_zero:
        if cfg.resume == "never" and cfg.checkpoint.overwrite and checkpoints_dir(plan.run_dir).exists():
            log.warning("checkpoint.overwrite=true: deleting %s", checkpoints_dir(plan.run_dir))
            shutil.rmtree(checkpoints_dir(plan.run_dir))
        write_config(plan)
    remaining = cfg.trainer.max_steps - plan.start_step
    if remaining <= 0:
        log.info("%s already reached trainer.max_steps=%d: nothing to train", plan.resume_from, cfg.trainer.max_steps)
        return RunResult(0, plan.start_step, 0.0, None, None, {}, None, None, rank_zero)

    with torch.device("meta"):
        flops_per_token = MPTForCausalLM(plan.model_config).flops_per_token(plan.model_config.max_seq_len)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if plan.accelerator == "gpu" else torch.device("cpu")
    monitor = ThroughputMonitor(flops_per_token=flops_per_token, peak_flops=peak_flops(cfg.trainer.peak_flops, device))
    callbacks = [monitor, ProgressDisplay(monitor, bar=cfg.trainer.progress_bar)]
    loggers = build_loggers(
        name=cfg.logger.name,
        mode=cfg.logger.mode,
        run_dir=plan.run_dir,
        run_name=cfg.logger.run_name or cfg.name,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        tags=list(cfg.logger.tags),
        config=redact(plan.config_dict),
        resume_step=plan.start_step if plan.resume_from is not None else 0,
        is_rank_zero=rank_zero,
    )
    if rank_zero:
        _log_start(plan, flops_per_token, monitor.peak_flops)
    module = MPTTrainingModule(plan)
    trainer = _build_trainer(plan, module, callbacks, loggers)
    start = time.perf_counter()
    # The module stops the loop at trainer.max_steps; rollbacks replay steps, hence the larger bound.
    trainer.fit(module, train_dataloaders=range(remaining * (cfg.guard.max_skips + 2)))
    wall = time.perf_counter() - start
    _finish_loggers(loggers, trainer.is_global_zero)
    if dist.is_available() and dist.is_initialized():
        # Without this barrier a fast rank can tear down gloo while a slow one still talks.
        dist.barrier()
        dist.destroy_process_group()
    return RunResult(
        steps_run=module.step - plan.start_step,
        final_step=module.step,
        wall_seconds=wall,
        first_loss=module.first_loss,
        last_loss=module.last.loss if module.last else None,
        val=dict(module.last_val),
        export_dir=module.export_dir,
        sample=module.sample_text,
        is_rank_zero=trainer.is_global_zero,
    )
