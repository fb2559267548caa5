"""The training loop. Lightning Fabric owns the processes, the device, the mesh and precision; `fit`
owns everything else and reads top to bottom:

    build the model (meta -> activation checkpointing/compile/FSDP2 -> weights), optimizer, data
    resume every component from a checkpoint, or start fresh
    each step: this rank's micro-batches forward/backward (FSDP2 reduce-scatters after each; after
      the last only with parallel.accumulate_unsharded=true), one
      all-reduce of the loss and of "did any rank get a signal", clip, the guard's verdict,
      optimizer step (or skip, or roll back), log, evaluate (validation loss, lm-eval tasks), checkpoint
    on a signal: checkpoint this step and return; at max_steps: final checkpoint, evaluation, export

Exact resume needs the loop to pull micro-batches from the resumable loader itself (nothing
prefetched past a checkpoint) and every component to save its state: progress, loader, guard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mptlike import faults
from mptlike.data import TokenDataset, build_loader
from mptlike.data.mixture import build_mixture_loader
from mptlike.model import MPTForCausalLM
from mptlike.parallel import build_mesh, is_sharded, materialize, parallelize, resolve_init_mode
from mptlike.parallel.float8 import precompute_scales_after_step
from mptlike.train.checkpoint import Checkpointer, load_pretrained_weights
from mptlike.train.evaluate import evaluate, evaluate_sources, open_val_sources, open_val_split
from mptlike.train.export import export_and_sample
from mptlike.train.flops import peak_flops
from mptlike.train.guard import Action, NonFiniteGuard, append_jsonl, truncate_jsonl
from mptlike.train.layout import GUARD_EVENTS, SAMPLES_LOG
from mptlike.train.loggers import build_loggers
from mptlike.train.optim import build_optimizer
from mptlike.train.plan import RunPlan
from mptlike.train.profile import StepProfiler
from mptlike.train.redact import redact
from mptlike.train.result import RunResult
from mptlike.train.schedule import LRScheduler
from mptlike.train.signals import OTHER_RANK, Preemption
from mptlike.train.step import reduce_and_clip
from mptlike.train.throughput import ThroughputMeter

log = logging.getLogger(__name__)


@dataclass
class Progress:
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))


def build_fabric(plan: RunPlan):
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.fabric.strategies import ModelParallelStrategy

    for name in ("lightning.pytorch", "lightning.fabric"):  # device banners and tips: warnings only
        logging.getLogger(name).setLevel(logging.WARNING)
    world = plan.world
    strategy: Any = "auto"
    if world.world_size > 1:
        # Fabric sets up the process group; mptlike.parallel builds the mesh (plan.mesh: FSDP2 or HSDP)
        # and shards the model itself, from outside the model (build_model): Fabric's own mesh
        # (data_parallel x tensor_parallel, no HSDP) and parallelize hook are not used.
        strategy = ModelParallelStrategy(parallelize_fn=lambda module, mesh: module,
                                         data_parallel_size=world.world_size, tensor_parallel_size=1)
    # Under torchrun (also inside SLURM), torchrun's ranks are the truth, not SLURM's tasks.
    plugins = [TorchElasticEnvironment()] if world.external else None
    return Fabric(accelerator=plan.accelerator, devices=world.devices, num_nodes=world.num_nodes, strategy=strategy,
                  precision=plan.precision.lightning, plugins=plugins)


def build_model(plan: RunPlan, fabric) -> MPTForCausalLM:
    """On meta first, so a large model never exists whole on one rank; then sharded and initialized."""

    def on_meta() -> MPTForCausalLM:
        with torch.device("meta"):
            return MPTForCausalLM(plan.model_config)

    model = on_meta()
    mesh = build_mesh(plan.mesh, fabric.device.type)  # None for one process
    parallelize(model, plan.parallel, mesh=mesh, param_dtype=plan.precision.param_dtype,
                reduce_dtype=plan.precision.reduce_dtype)
    init = resolve_init_mode(str(plan.cfg.parallel.init), fabric.device, plan.world.world_size)
    materialize(model, fabric.device, seed=plan.cfg.seed, init=init, build_full=on_meta)
    if plan.init_from is not None and plan.resume_from is None:
        load_pretrained_weights(model, plan.init_from)
        log.info("initialized the weights from %s", plan.init_from)
    return model


def train_step(model: nn.Module, batches, fabric, *, accumulation: int, grad_clip: float, poisoned: bool,
               stop_requested: Callable[[], bool], accumulate_unsharded: bool = False) -> tuple[float, float, bool]:
    """Forward/backward over this rank's micro-batches of one global batch, then clip.

    Under FSDP2 every micro-batch's backward reduce-scatters its gradients into the sharded ones, so a
    rank never holds more than its shard between micro-batches. `accumulate_unsharded`
    (parallel.accumulate_unsharded) instead reduce-scatters once, after the last micro-batch: less
    communication, but a full fp32 gradient of every parameter on every rank until then.

    Returns (mean loss over the global batch, gradient norm before clipping, whether any rank was
    asked to stop); the same three values on every rank.
    """
    sharded = is_sharded(model)
    loss_sum = torch.zeros((), device=fabric.device)
    for i in range(accumulation):
        micro = {k: v.to(fabric.device, non_blocking=True) for k, v in next(batches).items()}
        if sharded and accumulate_unsharded:
            model.set_requires_gradient_sync(i == accumulation - 1)  # reduce-scatter once, after the last
        with fabric.autocast():
            loss = model(micro["input_ids"], labels=micro["labels"], sequence_id=micro.get("sequence_id")).loss
        if poisoned:
            loss = loss * float("nan")
        fabric.backward(loss / accumulation)
        loss_sum += loss.detach().float()
    # The flag is read as late as possible: a signal during this step's forward/backward stops after it.
    return reduce_and_clip(model, loss_sum, micro_batches=accumulation, stop_requested=stop_requested(),
                           grad_clip=grad_clip)


class Run:
    """The loop's components and the few things it does between steps (evaluate, save, roll back, finish).

    A checkpoint is the union of the components' states: `progress`, `loader`, `guard`.
    """

    def __init__(self, plan: RunPlan, fabric) -> None:
        cfg, o, ck = plan.cfg, plan.cfg.optim, plan.cfg.checkpoint
        self.plan, self.cfg, self.fabric = plan, cfg, fabric
        self.rank, self.world = fabric.global_rank, fabric.world_size
        # The ranks of a tensor-parallel group (parallel.tp) read the same samples: data goes by data-parallel rank.
        self.dp_rank, self.dp_world = plan.mesh.dp_rank(self.rank), plan.mesh.dp_size
        self.rank_zero = self.rank == 0
        self.model = build_model(plan, fabric)
        self.optimizer = build_optimizer(self.model, name=str(o.name), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                         weight_decay=o.weight_decay, decay_params=str(o.decay_params),
                                         impl=str(o.impl), device_type=fabric.device.type)
        # float8 all-gather (parallel.float8 under FSDP2): the weights' scales after each optimizer step and load.
        self.float8_scales = precompute_scales_after_step(self.optimizer, self.model) if plan.parallel.float8 else None
        self.scheduler = LRScheduler(self.optimizer, plan.schedule, o.lr)
        seq_len, with_sequence_id = plan.model_config.max_seq_len, plan.model_config.attn_uses_sequence_id
        batching = dict(global_batch_size=cfg.trainer.global_batch_size, micro_batch_size=cfg.trainer.micro_batch_size,
                        rank=self.dp_rank, world_size=self.dp_world, seed=cfg.seed, num_workers=cfg.data.num_workers,
                        pin_memory=fabric.device.type == "cuda")
        if plan.data.sources:  # data.sources: a weighted mixture (mptlike.data.mixture)
            self.loader = build_mixture_loader(plan.data.sources, seq_len=seq_len, with_sequence_id=with_sequence_id,
                                               **batching)
        else:
            train_data = TokenDataset(plan.data.path, "train", seq_len=seq_len, with_sequence_id=with_sequence_id)
            self.loader = build_loader(train_data, **batching)
        self.val_data: TokenDataset | dict[str, TokenDataset] | None = None
        if cfg.eval.every_n_steps or cfg.eval.at_end:
            if plan.data.sources:  # one val split per source: val/<source>/loss
                self.val_data = open_val_sources(plan.data.sources, seq_len=seq_len, with_sequence_id=with_sequence_id)
            else:
                self.val_data = open_val_split(plan.data.path, seq_len=seq_len, with_sequence_id=with_sequence_id)
        self.tasks = None
        if cfg.eval.tasks:
            # lm-eval is imported only here: a run without eval.tasks never loads it.
            from mptlike.train.tasks import TaskEvaluator

            self.tasks = TaskEvaluator(cfg.eval, model=self.model, data_path=plan.data.path, device=fabric.device,
                                       autocast=fabric.autocast, rank=self.rank, world_size=self.world,
                                       batch_size=cfg.trainer.micro_batch_size)
        self.progress = Progress()
        self.guard = NonFiniteGuard(cfg.guard.nonfinite, cfg.guard.max_skips, plan.run_dir if self.rank_zero else None)
        self.checkpointer = Checkpointer(plan.run_dir, every_n_steps=ck.every_n_steps, keep_last=ck.keep_last,
                                         async_save=ck.async_save, identity=plan.identity)
        if self.rank_zero:
            self.checkpointer.remove_stale_tmp()
        if plan.resume_from is not None:
            self.load(plan.resume_from, self.components)
        else:
            # Dropout differs per rank on purpose; the weights were seeded on their own.
            torch.manual_seed(cfg.seed + 1 + self.rank)
        self.start_step = self.progress.step
        if self.rank_zero:
            # Rows a killed run wrote after its last checkpoint describe steps that run again.
            truncate_jsonl(plan.run_dir / SAMPLES_LOG, self.start_step)
            truncate_jsonl(plan.run_dir / GUARD_EVENTS, self.start_step)
        self.loggers = build_loggers(cfg, run_dir=plan.run_dir, config=redact(plan.config_dict),
                                     start_step=self.start_step, is_rank_zero=self.rank_zero)
        with torch.device("meta"):
            flops_per_token = MPTForCausalLM(plan.model_config).flops_per_token(plan.model_config.max_seq_len)
        self.meter = ThroughputMeter(flops_per_token=flops_per_token,
                                     peak_flops=peak_flops(cfg.trainer.peak_flops, fabric.device),
                                     tokens_per_step=plan.tokens_per_step,
                                     samples_per_step=cfg.trainer.global_batch_size, world_size=self.world,
                                     device=fabric.device)
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.val: dict[str, float] = {}

    @property
    def components(self) -> dict[str, Any]:
        return {"progress": self.progress, "loader": self.loader, "guard": self.guard}

    def load(self, path: Path, components: dict[str, Any]) -> None:
        """Moments, step and data position come from the checkpoint; hyperparameters from the config."""
        groups = self.optimizer.param_groups
        hparams = [{k: g[k] for k in ("betas", "eps", "weight_decay") if k in g} for g in groups]
        state = self.checkpointer.load(path, self.model, self.optimizer, components)
        if self.float8_scales is not None:
            self.float8_scales()
        for group, values in zip(groups, hparams, strict=True):
            group.update(values)
        log.info("resumed from %s at step %d (saved at world size %d)", path, self.progress.step,
                 state["world_size"])

    def sample_ids(self, position: int) -> list[int] | list[str]:
        """The global batch at `position`: sample indices, or "source:index" for a mixture."""
        return self.loader.batch_ids(position)

    def skip_rolled_back_batches(self, batches) -> int:
        """Draw and drop the global batches a rollback passes over; returns the position this step reads."""
        while self.loader.samples_consumed in self.guard.skip_positions:
            for _ in range(self.plan.accumulation_steps):
                next(batches)
        return self.loader.samples_consumed

    def check(self, *, loss: float, grad_norm: float, position: int) -> Action:
        """The guard's verdict on the step about to be taken (NonFiniteError for stop)."""
        step = self.progress.step + 1
        try:
            action = self.guard.check(step=step, loss=loss, grad_norm=grad_norm, position=position,
                                      ids_of=self.sample_ids)
        except Exception:
            self.checkpointer.wait()  # the save before this step holds finite weights: let it complete
            raise
        if action is not Action.STEP:
            self.loggers.log({"guard/nonfinite_step": 1.0}, step)
        return action

    def rollback(self, position: int):
        """Reload the newest complete checkpoint; returns a fresh iterator over the loader."""
        self.checkpointer.wait()
        newest = self.checkpointer.newest(at_most=self.progress.step)
        if newest is None:
            raise self.guard.no_checkpoint_to_roll_back_to(self.progress.step + 1, self.sample_ids(position))
        # The guard keeps its newer state: the event just counted and the position to pass over.
        self.load(newest, {"progress": self.progress, "loader": self.loader})
        if self.rank_zero:
            truncate_jsonl(self.plan.run_dir / SAMPLES_LOG, self.progress.step)
        self.loggers.truncate(self.progress.step)
        self.meter.restart()
        return iter(self.loader)

    def log_step(self, *, loss: float, lr: float, grad_norm: float, position: int, skipped: bool) -> None:
        """Metrics every trainer.log_every_n_steps steps, at the last step, and at every skipped step."""
        cfg, step = self.cfg, self.progress.step
        self.meter.step()
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        if cfg.debug.log_sample_ids and self.rank_zero:
            append_jsonl(self.plan.run_dir / SAMPLES_LOG, {"step": step, "samples": self.sample_ids(position)})
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}
        if step % cfg.trainer.log_every_n_steps == 0 or step == cfg.trainer.max_steps:
            metrics.update(self.meter.report(), **{"train/tokens_seen": float(self.progress.tokens_seen)})
        elif not skipped:
            return
        if skipped:
            metrics["train/skipped_step"] = 1.0
        self.loggers.log(metrics, step)

    def evaluate(self) -> None:
        if self.val_data is None:
            return
        cfg = self.cfg
        with self.meter.paused(), self.fabric.autocast():
            score = evaluate_sources if isinstance(self.val_data, dict) else evaluate
            metrics = score(self.model, self.val_data, max_samples=cfg.eval.max_samples,
                            micro_batch_size=cfg.trainer.micro_batch_size, rank=self.dp_rank, world_size=self.dp_world,
                            device=self.fabric.device)
        if metrics:
            self.val = metrics
            self.loggers.log(metrics, self.progress.step)
            log.info("step %d: val/loss %.4f, val/perplexity %.2f", self.progress.step, metrics["val/loss"],
                     metrics["val/perplexity"])

    def tasks_due(self) -> bool:
        every = self.cfg.eval.tasks_every_n_steps
        return self.tasks is not None and bool(every) and self.progress.step % every == 0

    def evaluate_tasks(self) -> None:
        """eval.tasks on the weights of this step (mptlike.train.tasks), logged as eval/<task>/<metric>."""
        if self.tasks is None:
            return
        started = time.perf_counter()
        with self.meter.paused():
            metrics = self.tasks.evaluate()
        self.loggers.log(metrics, self.progress.step)
        shown = ", ".join(f"{name.removeprefix('eval/')} {value:.4g}" for name, value in metrics.items())
        log.info("step %d: %s (%.1fs)", self.progress.step, shown, time.perf_counter() - started)

    def save(self) -> None:
        with self.meter.paused():
            self.checkpointer.save(self.progress.step, self.model, self.optimizer, self.components)

    def finish(self, *, preempted_by: str | None, wall_seconds: float) -> RunResult:
        """Preempted: checkpoint this step. Done: final checkpoint, evaluation, export and sample."""
        cfg, step = self.cfg, self.progress.step
        export_dir = sample = checkpoint = None
        trained = step > self.start_step
        if preempted_by is not None or (trained and cfg.checkpoint.save_final):
            if self.checkpointer.last_saved_step != step:
                self.save()
        self.checkpointer.wait()
        if preempted_by is not None:
            checkpoint = self.checkpointer.last_path
        else:
            if trained and cfg.eval.at_end:
                self.evaluate()
                self.evaluate_tasks()
            if cfg.checkpoint.export_final or cfg.sample.max_new_tokens:
                export_dir, sample = export_and_sample(self.model, self.plan)
            if export_dir is not None:
                self.loggers.log_model(export_dir, step)
        return RunResult(final_step=step, steps_run=step - self.start_step, wall_seconds=wall_seconds,
                         first_loss=self.first_loss, last_loss=self.last_loss, val=self.val, export_dir=export_dir,
                         sample=sample, is_rank_zero=self.rank_zero, preempted_by=preempted_by, checkpoint=checkpoint)


def fit(plan: RunPlan, *, on_start: Callable[[], None], preemption: Preemption) -> RunResult:
    """Train as `plan` says. `on_start()` runs once everything is built and loaded, before step one;
    `preemption` (entered by mptlike.train.run) says whether a signal asked the run to stop."""
    cfg, max_steps = plan.cfg, plan.cfg.trainer.max_steps
    injected = faults.active()  # tests only (MPTLIKE_FAULTS); read once, before anything is built
    fabric = build_fabric(plan)
    fabric.launch()
    run = Run(plan, fabric)
    profiler = StepProfiler(cfg.debug.profile_steps, plan.run_dir, rank=run.rank, device=fabric.device)
    try:
        injected.maybe_signal(0, run.rank)  # "during setup"
        on_start()
        started = time.perf_counter()
        stop = False
        batches = iter(run.loader)
        while run.progress.step < max_steps:
            profiler.step_starts(run.progress.step + 1)
            position = run.skip_rolled_back_batches(batches)
            lr = run.scheduler.apply(run.progress.step)
            injected.maybe_signal(run.progress.step + 1, run.rank)
            loss, grad_norm, stop = train_step(
                run.model, batches, fabric, accumulation=plan.accumulation_steps, grad_clip=cfg.optim.grad_clip,
                poisoned=injected.poisons(position, cfg.trainer.global_batch_size),
                stop_requested=lambda: preemption.requested is not None,
                accumulate_unsharded=plan.parallel.accumulate_unsharded)
            action = run.check(loss=loss, grad_norm=grad_norm, position=position)
            if action is Action.STEP:
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            if action is Action.ROLLBACK:
                batches = run.rollback(position)
                continue
            run.progress.step += 1
            run.progress.tokens_seen += plan.tokens_per_step
            run.log_step(loss=loss, lr=lr, grad_norm=grad_norm, position=position, skipped=action is Action.SKIP)
            profiler.step_ended(run.progress.step)
            if run.progress.step >= max_steps:
                stop = False  # a signal during the last step: the run ends normally, with its export
                break
            if stop:
                break
            if cfg.eval.every_n_steps and run.progress.step % cfg.eval.every_n_steps == 0:
                run.evaluate()
            if run.tasks_due():
                run.evaluate_tasks()
            if run.checkpointer.due(run.progress.step):
                run.save()
        preempted_by = (preemption.requested or OTHER_RANK) if stop else None
        return run.finish(preempted_by=preempted_by, wall_seconds=time.perf_counter() - started)
    finally:
        profiler.close()  # a run that stopped inside debug.profile_steps writes what it recorded
        run.loggers.close()  # also on an error: W&B flushes its offline file, the progress bar ends
