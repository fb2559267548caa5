"""`trainer.backend=composer`: composer.Trainer drives the loop; `fit(plan)` is what mptlike.train.run calls.

`build_composer_trainer(plan)` gives the same training as the Lightning loop, step for step: the
same model init, our optimizer objects (DecoupledAdamW / DecoupledLionW), our schedule function
(handed to Composer as its own kind of scheduler, so `optim.lr_timing=composer` is Composer's timing
itself; a LambdaLR counting its own steps for `exact`), global-norm clipping, the NonFiniteGuard,
and our loader's sample order. Composer owns the loop, precision, FSDP2 sharding and checkpoints;
mptlike's loggers, throughput meter and preemption handling ride along as callbacks.

Preemption: SIGTERM, SIGUSR1 or SIGINT on any rank raises a flag (mptlike.train.signals); TrainStep
all-reduces it with the step's loss, so every rank finishes the same step, calls
`state.stop_training()`, and the checkpoint interval makes Composer's CheckpointSaver write that
step at BATCH_CHECKPOINT on every rank before fit() returns. `resume=auto` continues from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.core import Callback, Evaluator
from composer.utils import reproducibility
from composer.utils.parallelism import FSDP2Config

from mptlike.data import ResumableLoader, TokenDataset, build_loader
from mptlike.integrations.composer.callbacks import (
    MptlikeMetrics,
    MptlikeRunInfo,
    PausingCheckpointSaver,
    TrainStep,
    every,
)
from mptlike.integrations.composer.data import composer_dataloader, eval_dataloader
from mptlike.integrations.composer.model import CE_METRIC, PPL_METRIC, ComposerMPT
from mptlike.model import MPTForCausalLM
from mptlike.parallel import apply_activation_checkpointing, apply_compile, materialize, resolve_init_mode
from mptlike.parallel.parallelize import average_gradients_where_avg_sums
from mptlike.train.checkpoint import checkpoints_dir, load_pretrained_weights
from mptlike.train.config import TrainConfig
from mptlike.train.export import export_and_sample
from mptlike.train.flops import peak_flops
from mptlike.train.guard import NonFiniteGuard, truncate_jsonl
from mptlike.train.layout import GUARD_EVENTS, SAMPLES_LOG
from mptlike.train.loggers import build_loggers
from mptlike.train.optim import build_optimizer
from mptlike.train.plan import RunPlan, build_plan, check_composer_plan
from mptlike.train.redact import redact
from mptlike.train.result import RunResult
from mptlike.train.schedule import Schedule
from mptlike.train.signals import OTHER_RANK, Preemption
from mptlike.train.throughput import ThroughputMeter

log = logging.getLogger(__name__)

EVAL_LABEL = "eval"
_DIST_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


class ComposerSchedule:
    """Our schedule as a Composer scheduler: a function of the trainer's State, read at its batch count.

    Composer compiles it into a LambdaLR that it steps at the end of each batch, before the batch
    counter advances, so batch t trains with schedule(t - 1) (batches 0 and 1 with schedule(0)):
    `optim.lr_timing=composer` here is Composer's own behaviour, the timing of every llm-foundry run.
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def __call__(self, state: Any, ssr: float = 1.0) -> float:
        return self.schedule(int(state.timestamp.batch))


def lambda_schedule(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """Our schedule as a LambdaLR: batch t trains with optim.lr * schedule(t) (`optim.lr_timing=exact`).

    LambdaLR counts its own steps (saved in Composer's checkpoint); a plain function keeps the
    schedule itself out of the checkpoint, so a resumed run follows the config it was started with.
    """

    def multiplier(step: int) -> float:
        return schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _fsdp_config(plan: RunPlan) -> FSDP2Config:
    precision = plan.precision
    if precision.name == "fp32" or precision.param_dtype is None:
        mixed = "FULL"  # fp32 parameters in compute
    elif precision.reduce_dtype == torch.float32:
        mixed = "DEFAULT"  # bf16 compute, fp32 gradient reduction
    else:
        mixed = "PURE"
    return FSDP2Config(
        reshard_after_forward=plan.parallel.reshard_after_forward,
        activation_checkpointing=False,  # applied by mptlike.parallel before sharding, as in the Lightning loop
        state_dict_type="sharded",
        mixed_precision=mixed,
    )


def build_model(plan: RunPlan, device: torch.device) -> MPTForCausalLM:
    """The model as the Lightning loop builds it: meta, checkpointing/compile, then materialized and seeded.

    With FSDP2 (world > 1), "rank0" init materializes the whole model on rank 0's CPU and Composer
    broadcasts it into the shards; "sharded" init leaves every rank on meta and Composer calls
    `ComposerMPT.param_init_fn` per module once the shards are allocated (on CUDA).
    """
    with torch.device("meta"):
        model = MPTForCausalLM(plan.model_config)
    apply_activation_checkpointing(model, plan.parallel.ac_mode, plan.parallel.ac_every)
    if plan.parallel.compile:
        apply_compile(model)
    world, rank = plan.world.world_size, plan.world.rank
    if world == 1:
        materialize(model, device, seed=plan.cfg.seed)
        return model
    if resolve_init_mode(str(plan.cfg.parallel.init), device, world) == "rank0" and rank == 0:
        materialize(model, torch.device("cpu"), seed=plan.cfg.seed)
    return model


def _keep_config_hyperparameters(
    optimizer: torch.optim.Optimizer, schedule: Schedule, peak_lr: float
) -> Callable[[torch.optim.lr_scheduler.LambdaLR, int], None]:
    """Returns a function that, after a checkpoint was loaded, puts the config's hyperparameters back.

    Loading restores param groups and the schedule's base rates as they were saved; as in the
    Lightning loop, moments and the step come from the checkpoint, hyperparameters from the config.
    The next batch trains with the lr its timing gives it (under `composer`, that of the step before).
    """
    saved = [{k: g[k] for k in ("betas", "eps", "weight_decay") if k in g} for g in optimizer.param_groups]

    def restore(scheduler: torch.optim.lr_scheduler.LambdaLR, next_step: int) -> None:
        multiplier = schedule.for_step(next_step)
        for group, values in zip(optimizer.param_groups, saved, strict=True):
            group.update(values, initial_lr=peak_lr, lr=peak_lr * multiplier)
        scheduler.base_lrs = [peak_lr] * len(optimizer.param_groups)

    return restore


def _trainer(plan: RunPlan, model: ComposerMPT, loader: ResumableLoader, optimizer: torch.optim.Optimizer,
             scheduler: ComposerSchedule | torch.optim.lr_scheduler.LambdaLR, evaluator: Evaluator | None,
             callbacks: list[Callback],
             metrics: MptlikeMetrics) -> Trainer:
    """composer.Trainer with our pieces, and the settings that make it train as the Lightning loop does."""
    cfg = plan.cfg
    gpu = plan.accelerator == "gpu"
    return Trainer(
        model=model,
        train_dataloader=composer_dataloader(loader),
        max_duration=f"{cfg.trainer.max_steps}ba",
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        eval_dataloader=evaluator,
        callbacks=list(callbacks),
        loggers=[metrics],
        run_name=cfg.logger.run_name or cfg.name,
        progress_bar=False,
        log_to_console=False,
        load_path=None if plan.resume_from is None else str(plan.resume_from),
        parallelism_config={"fsdp": _fsdp_config(plan)} if plan.world.world_size > 1 else None,
        device="gpu" if gpu else "cpu",
        precision="amp_bf16" if plan.precision.name == "bf16" else "fp32",
        device_train_microbatch_size=cfg.trainer.micro_batch_size,
        # Each micro-batch counts 1/accumulation_steps, the Lightning loop's weighting.
        accumulate_train_batch_on_tokens=False,
        # Composer seeds rank r with seed + r: the Lightning loop's dropout seed, cfg.seed + 1 + r.
        seed=cfg.seed + 1,
        spin_dataloaders=False,
    )


def _evaluator(plan: RunPlan, step: TrainStep) -> Evaluator | None:
    cfg, world = plan.cfg, plan.world
    val_loader = eval_dataloader(plan, world.rank, world.world_size)
    if val_loader is None:
        return None
    return Evaluator(
        label=EVAL_LABEL,
        dataloader=val_loader,
        metric_names=[CE_METRIC, PPL_METRIC],
        # No evaluation at a preempted step: the loop skips it too, to get the checkpoint out sooner.
        eval_interval=every(cfg.eval.every_n_steps, cfg.trainer.max_steps, cfg.eval.at_end,
                            unless=lambda: step.stopping),
        device_eval_microbatch_size=cfg.trainer.micro_batch_size,
    )


def _checkpoint_saver(plan: RunPlan, meter: ThroughputMeter, step: TrainStep) -> PausingCheckpointSaver:
    cfg, ck = plan.cfg, plan.cfg.checkpoint
    return PausingCheckpointSaver(
        meter,
        folder=str(checkpoints_dir(plan.run_dir)),
        remote_file_name=None,
        latest_remote_file_name=None,
        # Also the step a signal stopped at, on every rank (Composer's save is collective).
        save_interval=every(ck.every_n_steps, cfg.trainer.max_steps, ck.save_final, also=lambda: step.stopping),
        # Our resume rules (resume=never refuses existing checkpoints) already guard against
        # clobbering; a run resumed from an older step may rewrite the steps after it.
        overwrite=True,
        num_checkpoints_to_keep=ck.keep_last if ck.keep_last > 0 else -1,
    )


def build_composer_trainer(
    cfg_or_plan: TrainConfig | RunPlan,
    *,
    preemption: Preemption | None = None,
    callbacks: Sequence[Callback] = (),
) -> Trainer:
    """A composer.Trainer for a validated RunPlan (or a TrainConfig, validated here); call `.fit()`.

    It resumes from `plan.resume_from` (model, optimizer, schedule, loader, guard, RNG). The data
    folder must exist already (mptlike.train.run.ensure_data). `preemption` is the entered
    mptlike.train.signals.Preemption whose signals end the run with a checkpoint (none: signals
    keep their usual effect).
    """
    plan = build_plan(cfg_or_plan) if isinstance(cfg_or_plan, TrainConfig) else cfg_or_plan
    check_composer_plan(plan)
    cfg, world, o = plan.cfg, plan.world, plan.cfg.optim
    rank_zero = world.rank == 0
    gpu = plan.accelerator == "gpu"
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")

    model = ComposerMPT(build_model(plan, device))
    optimizer = build_optimizer(model.model, name=str(o.name), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                weight_decay=o.weight_decay, decay_params=str(o.decay_params), impl=str(o.impl),
                                device_type=device.type)
    scheduler = (ComposerSchedule(plan.schedule) if plan.schedule.timing == "composer"
                 else lambda_schedule(optimizer, plan.schedule))
    restore_hyperparameters = _keep_config_hyperparameters(optimizer, plan.schedule, o.lr)
    train = TokenDataset(plan.data.path, "train", seq_len=plan.model_config.max_seq_len,
                         with_sequence_id=plan.model_config.attn_uses_sequence_id)
    # One item per step: this rank's share of the global batch, which Composer cuts into micro-batches.
    loader = build_loader(train, global_batch_size=cfg.trainer.global_batch_size,
                          micro_batch_size=cfg.trainer.global_batch_size // world.world_size, rank=world.rank,
                          world_size=world.world_size, seed=cfg.seed, num_workers=cfg.data.num_workers, pin_memory=gpu)

    if rank_zero:
        # Rows a killed run wrote after its last checkpoint describe steps that run again.
        truncate_jsonl(plan.run_dir / SAMPLES_LOG, plan.start_step)
        truncate_jsonl(plan.run_dir / GUARD_EVENTS, plan.start_step)
    meter = ThroughputMeter(flops_per_token=model.flops_per_token(plan.model_config.max_seq_len),
                            peak_flops=peak_flops(cfg.trainer.peak_flops, device),
                            tokens_per_step=plan.tokens_per_step, samples_per_step=cfg.trainer.global_batch_size,
                            world_size=world.world_size, device=device)
    step = TrainStep(
        loader=loader,
        guard=NonFiniteGuard(cfg.guard.nonfinite, cfg.guard.max_skips, plan.run_dir if rank_zero else None,
                             policies=("stop", "skip")),  # Composer cannot roll back mid-fit
        meter=meter,
        preemption=preemption or Preemption(),  # never entered: no signal changes anything
        grad_clip=o.grad_clip,
        max_steps=cfg.trainer.max_steps,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        tokens_per_step=plan.tokens_per_step,
        samples_log=plan.run_dir / SAMPLES_LOG if cfg.debug.log_sample_ids and rank_zero else None,
    )
    loggers = build_loggers(cfg, run_dir=plan.run_dir, config=redact(plan.config_dict), start_step=plan.start_step,
                            is_rank_zero=rank_zero)
    try:
        trainer = _trainer(plan, model, loader, optimizer, scheduler, _evaluator(plan, step),
                           # The model config as written (attn_impl may stay auto), as final/config.json has it.
                           [step, MptlikeRunInfo(plan.cfg.model), _checkpoint_saver(plan, meter, step), *callbacks],
                           MptlikeMetrics(loggers))  # which closes the loggers when the trainer closes
    except BaseException:
        loggers.close()  # a W&B run is finished even when Composer refuses the setup
        raise
    if plan.resume_from is not None:
        restore_hyperparameters(trainer.state.schedulers[0], int(trainer.state.timestamp.batch))
        restore_checkpoint_rng(trainer)
        log.info("resumed from %s at step %d", plan.resume_from, int(trainer.state.timestamp.batch))
    elif plan.init_from is not None:
        # After sharding, as the Lightning loop does: rank 0 reads the file, every rank keeps its shards.
        load_pretrained_weights(trained_model(trainer), plan.init_from)
        log.info("initialized the weights from %s", plan.init_from)
    if world.world_size > 1 and average_gradients_where_avg_sums(trainer.state.model):
        log.info("this torch's gloo AVG reduce-scatter sums: FSDP2 gradients are divided by the world size after it")
    return trainer


def trained_model(trainer: Trainer) -> MPTForCausalLM:
    """The MPTForCausalLM inside a Trainer from build_composer_trainer (sharded in place under FSDP2)."""
    return trainer.state.model.model


def train_step_callback(trainer: Trainer) -> TrainStep:
    return next(cb for cb in trainer.state.callbacks if isinstance(cb, TrainStep))


def restore_checkpoint_rng(trainer: Trainer) -> None:
    """Restore the resumed checkpoint's RNG before the first batch.

    Composer restores it only when a run resumes at an epoch boundary or while spinning the
    dataloader; our loader resumes itself mid-epoch (the stream is one endless epoch), so without
    this, dropout after a resume would draw from the freshly seeded generator.
    """
    pending = getattr(trainer, "_rng_state", None)
    if pending is not None and int(trainer.state.timestamp.batch_in_epoch) > 0:
        reproducibility.load_rng_state(pending)
        trainer._rng_state = None


def last_checkpoint(trainer: Trainer) -> Path | None:
    """The checkpoint this process's CheckpointSaver wrote last: the file, or the sharded checkpoint's folder."""
    saver = next(cb for cb in trainer.state.callbacks if isinstance(cb, PausingCheckpointSaver))
    if not saver.saved_checkpoints:
        return None
    path = Path(saver.saved_checkpoints[-1])
    return path.parent if trainer.state.fsdp_sharded_state_dict_enabled else path


@contextlib.contextmanager
def _launcher_env() -> Iterator[None]:
    """The environment Composer reads its ranks from, put back afterwards.

    torchrun names the node GROUP_RANK; Composer reads NODE_RANK. In one process Composer writes
    RANK=0, WORLD_SIZE=1, ... into os.environ, which would make the next run in this process
    (tests, notebooks) look launched by torchrun.
    """
    before = {key: os.environ.get(key) for key in _DIST_ENV}
    if "RANK" in os.environ and "NODE_RANK" not in os.environ:
        os.environ["NODE_RANK"] = os.environ.get("GROUP_RANK", "0")
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _quiet_composer() -> None:
    # Composer logs its setup at INFO (seeds, run name, precision); our progress lines say what matters.
    logging.getLogger("composer").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*FSDP2 Config/APIs are experimental.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def fit(plan: RunPlan, *, on_start: Callable[[], None], preemption: Preemption) -> RunResult:
    """Train as `plan` says with composer.Trainer; the steps around it are mptlike.train.run's.

    `on_start()` runs once the trainer is built and any checkpoint loaded, before step one;
    `preemption` (entered by mptlike.train.run) says whether a signal asked the run to stop.
    """
    cfg = plan.cfg
    _quiet_composer()
    with _launcher_env():
        trainer = build_composer_trainer(plan, preemption=preemption)
        on_start()
        step = train_step_callback(trainer)
        try:
            started = time.perf_counter()
            trainer.fit()
            wall = time.perf_counter() - started
            export_dir = sample = checkpoint = None
            if step.stopping:
                checkpoint = last_checkpoint(trainer)
            elif cfg.checkpoint.export_final or cfg.sample.max_new_tokens:
                export_dir, sample = export_and_sample(trained_model(trainer), plan)
            if export_dir is not None:
                for destination in trainer.logger.destinations:
                    if isinstance(destination, MptlikeMetrics):
                        destination.loggers.log_model(export_dir, int(trainer.state.timestamp.batch))
        finally:
            trainer.close()  # also closes mptlike's loggers (MptlikeMetrics.post_close)
    final_step = int(trainer.state.timestamp.batch)
    losses = [step.losses[k] for k in sorted(step.losses)]
    return RunResult(
        final_step=final_step,
        steps_run=final_step - plan.start_step,
        wall_seconds=wall,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        val=dict(step.val),
        export_dir=export_dir,
        sample=sample,
        is_rank_zero=plan.world.rank == 0,
        preempted_by=(preemption.requested or OTHER_RANK) if step.stopping else None,
        checkpoint=checkpoint,
    )
