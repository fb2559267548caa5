"""MPT inside MosaicML Composer: the ComposerModel, our loader as Composer data, and a Trainer from our config.

`build_composer_trainer(plan)` gives the same training as the Lightning path, step for step: the
same model init, our optimizer objects (DecoupledAdamW / DecoupledLionW), our schedule function in
a LambdaLR (so every learning rate is the same number), our global-norm clipping, and our loader's
sample order. Composer owns the loop, precision, FSDP2 sharding, checkpoints and loggers.

Data: each Composer batch is one rank's share of one global batch (global_batch_size / world
sequences); Composer cuts it into micro-batches of trainer.micro_batch_size, in order, which are
exactly the micro-batches the Lightning path draws. The loader's position travels in Composer's
checkpoint through the `state_dict` / `load_state_dict` protocol Composer calls on a DataLoader's
dataset, so resuming never replays ("spins") the data already seen.

Importing this module needs Composer (`pip install 'mptlike[composer]'` in a torch 2.6-2.7
environment); `mptlike.train.composer_runner` starts runs and reads their checkpoints without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from composer import Trainer
from composer.core import Callback, Event, State
from composer.loggers import Logger, LoggerDestination
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from mptlike.data import ResumableLoader
from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.model.init import init_weights
from mptlike.ops.loss import cross_entropy
from mptlike.parallel.parallelize import average_gradients_where_avg_sums
from mptlike.train.composer_runner import RUN_INFO_CONFIG, RUN_INFO_VERSION, check_composer_plan, checkpoint_folder

if TYPE_CHECKING:
    from mptlike.train.config import TrainConfig
    from mptlike.train.loggers import CSVMetricsLogger
    from mptlike.train.plan import RunPlan
    from mptlike.train.schedule import Schedule

log = logging.getLogger(__name__)

EVAL_LABEL = "eval"
CE_METRIC, PPL_METRIC = "LanguageCrossEntropy", "LanguagePerplexity"


# ---- the model ----------------------------------------------------------------------------------


class ComposerMPT(ComposerModel):
    """`MPTForCausalLM` as a ComposerModel; its parameters appear under `model.` in Composer's state."""

    def __init__(self, model: MPTForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.config: MPTConfig = model.config
        # A parameter-free twin on the meta device keeps FLOP counting in MPTForCausalLM (one formula)
        # and global parameter counts, whatever sharding does to the real parameters later.
        with torch.device("meta"):
            twin = MPTForCausalLM(model.config)
        self._flops_per_token = twin.flops_per_token
        # Composer looks these hooks up on the wrapped child module (FSDP wrapping and meta init).
        model.fsdp_wrap_fn = self.fsdp_wrap_fn
        model.param_init_fn = self.param_init_fn

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], sequence_id=batch.get("sequence_id")).logits

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model's own loss: mean next-token cross-entropy against the already-shifted labels."""
        return cross_entropy(outputs.reshape(-1, outputs.shape[-1]), batch["labels"].reshape(-1))

    def eval_forward(self, batch: Mapping[str, torch.Tensor], outputs: Any = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool) -> dict[str, Any]:
        # Training metrics would cost a second cross-entropy pass over the logits every step; the
        # training loss is already logged.
        if is_train:
            return {}
        return {CE_METRIC: LanguageCrossEntropy(), PPL_METRIC: LanguagePerplexity()}

    def update_metric(self, batch: Mapping[str, torch.Tensor], outputs: torch.Tensor, metric: Any) -> None:
        metric.update(outputs.float(), batch["labels"])

    def flops_per_batch(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Training FLOPs of one batch for Composer's SpeedMonitor: flops_per_token(seq) x tokens."""
        input_ids = batch["input_ids"]
        return self._flops_per_token(input_ids.shape[-1]) * input_ids.numel()

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Shard every block (or its activation-checkpointing wrapper) as one FSDP unit."""
        return any(module is block for block in self.model.transformer.blocks)

    def param_init_fn(self, module: nn.Module) -> None:
        """Initialize the parameters held directly by `module` with the config's scheme (meta init)."""
        init_weights(_OneModule(self.config, module))


class _OneModule:
    """Presents one module to `init_weights`, which walks `.modules()` and reads `.config`."""

    def __init__(self, config: MPTConfig, module: nn.Module) -> None:
        self.config = config
        self._module = module

    def modules(self) -> Iterator[nn.Module]:
        yield self._module


# ---- data -----------------------------------------------------------------------------------------


class LoaderDataset(IterableDataset):
    """Our ResumableLoader behind the dataset protocol Composer checkpoints and restores.

    Composer calls `state_dict(num_samples, from_beginning)` on a DataLoader's dataset when it saves
    and `load_state_dict(obj)` when it resumes; the loader counts its own samples, so both
    arguments are ignored.
    """

    def __init__(self, loader: ResumableLoader) -> None:
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.loader)

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        self.loader.load_state_dict(obj)


def composer_dataloader(loader: ResumableLoader) -> DataLoader:
    """A DataLoader that hands Composer one item of `loader` per step and nothing ahead of it.

    No workers and no prefetch here (the loader has its own), so the loader's position at a
    checkpoint is exactly the number of global batches trained.
    """
    if loader.accumulation_steps != 1:
        raise ValueError("build the Composer loader with micro_batch_size = global_batch_size / world_size")
    return DataLoader(LoaderDataset(loader), batch_size=None, num_workers=0)


# ---- per-step training behaviour and metrics --------------------------------------------------------


class TrainStep(Callback):
    """Clip gradients, skip non-finite steps, and report what the Lightning path reports, by the same names.

    Clipping runs after the last micro-batch's backward and before the optimizer step, as
    Composer's own GradientClipping does, with `clip_grad_norm_` over all gradients (the global
    norm, also under FSDP2). A step whose gradient norm or loss is not finite drops every
    gradient, so the optimizer leaves parameters and moments untouched; the schedule still moves on.
    Metrics: train/loss, train/lr, train/grad_norm every step; throughput and MFU every
    `log_every_n_steps`; val/loss and val/perplexity after each evaluation.
    """

    def __init__(
        self,
        *,
        grad_clip: float,
        max_nonfinite_steps: int,
        max_steps: int,
        log_every_n_steps: int,
        tokens_per_step: int,
        flops_per_token: int,
        peak_flops: float | None,
    ) -> None:
        self.grad_clip = grad_clip
        self.max_nonfinite_steps = max_nonfinite_steps
        self.max_steps = max_steps
        self.log_every_n_steps = log_every_n_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.losses: dict[int, float] = {}  # optimizer step (1-based) -> mean loss over the global batch
        self.val: dict[str, float] = {}
        self._lr = 0.0
        self._grad_norm = float("nan")
        self._skipped = False
        self._nonfinite = 0
        self._window_start = 0.0
        self._window_steps = 0
        self._eval_seconds = 0.0
        self._eval_started = 0.0

    def fit_start(self, state: State, logger: Logger) -> None:
        self._restart()

    def _restart(self) -> None:
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._eval_seconds = 0.0

    def batch_start(self, state: State, logger: Logger) -> None:
        # The scheduler steps after the batch: read the rate this batch uses now.
        self._lr = state.optimizers[0].param_groups[0]["lr"]

    def after_train_batch(self, state: State, logger: Logger) -> None:
        params = [p for p in state.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # Under FSDP2 the norm is a DTensor of partial sums: full_tensor() all-reduces it.
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self._grad_norm = norm.item()
        loss = state.loss.item() if isinstance(state.loss, torch.Tensor) else 0.0
        self._skipped = not (math.isfinite(self._grad_norm) and math.isfinite(loss))
        if not self._skipped:
            self._nonfinite = 0
            return
        self._nonfinite += 1
        step = int(state.timestamp.batch) + 1
        log.warning("step %d: non-finite loss %s or grad norm %s, optimizer step skipped", step, loss, self._grad_norm)
        if self._nonfinite >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"{self._nonfinite} consecutive steps with a non-finite loss: lower optim.lr, raise "
                f"optim.warmup_steps, or resume from an earlier checkpoint"
            )
        for p in params:
            p.grad = None

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        loss = float(state.total_loss_dict["loss/train/total"])
        self.losses[step] = loss
        self._window_steps += 1
        metrics = {"train/loss": loss, "train/lr": self._lr, "train/grad_norm": self._grad_norm}
        if self._skipped:
            metrics["train/skipped_step"] = 1.0
        if step % self.log_every_n_steps == 0 or step == self.max_steps:
            metrics.update(self._speed(state, step))
            mfu = f"{metrics['train/mfu']:.1%}" if "train/mfu" in metrics else "n/a"
            log.info("step %d/%d | loss %.4f | lr %.2e | %s tok/s | mfu %s", step, self.max_steps, loss, self._lr,
                     f"{metrics['train/tokens_per_sec']:,.0f}", mfu)
            self._restart()
        logger.log_metrics(metrics)

    def _speed(self, state: State, step: int) -> dict[str, float]:
        from mptlike.train.flops import mfu

        if state.device.name == "gpu":
            torch.cuda.synchronize()
        elapsed = max(time.perf_counter() - self._window_start - self._eval_seconds, 1e-9)
        world = max(1, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        tokens_per_sec = self._window_steps * self.tokens_per_step / elapsed
        metrics = {
            "train/tokens_per_sec": tokens_per_sec,
            "train/tflops_per_device": self.flops_per_token * tokens_per_sec / world / 1e12,
            "train/tokens_seen": float(step * self.tokens_per_step),
        }
        utilization = mfu(self.flops_per_token, tokens_per_sec / world, self.peak_flops)
        if utilization is not None:
            metrics["train/mfu"] = utilization
        return metrics

    def eval_start(self, state: State, logger: Logger) -> None:
        self._eval_started = time.perf_counter()

    def eval_end(self, state: State, logger: Logger) -> None:
        self._eval_seconds += time.perf_counter() - self._eval_started
        values = state.eval_metric_values
        if CE_METRIC not in values:
            return
        loss = float(values[CE_METRIC])
        self.val = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 80.0))}
        logger.log_metrics(self.val)
        log.info("step %d: val/loss %.4f, val/perplexity %.2f", int(state.timestamp.batch), loss,
                 self.val["val/perplexity"])


class MptlikeRunInfo(Callback):
    """Puts the model config into every Composer checkpoint, so its weights convert without the run folder."""

    def __init__(self, model_config: MPTConfig) -> None:
        self.model_config = model_config

    def state_dict(self) -> dict[str, Any]:
        # One JSON string survives both checkpoint formats (a pickled file, sharded DCP) unchanged.
        return {"version": RUN_INFO_VERSION, RUN_INFO_CONFIG: json.dumps(self.model_config.to_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # the config of the run being resumed comes from the command line, as in the Lightning path


class MetricsFile(LoggerDestination):
    """Our metrics.csv (`logger=csv`): the train/ and val/ names, one row per optimizer step."""

    def __init__(self, csv_logger: CSVMetricsLogger) -> None:
        super().__init__()
        self.csv = csv_logger

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        ours = {k: _scalar(v) for k, v in metrics.items() if k.startswith(("train/", "val/"))}
        if ours:
            self.csv.log_metrics(ours, step=step)


class WandbDestination(LoggerDestination):
    """Weights & Biases through the wandb API itself, from rank 0.

    Composer 0.32's own WandBLogger calls `Run.get_url()`, which current wandb releases (the
    ones mptlike's `wandb>=0.17` resolves to) no longer have, so it fails when training starts.
    """

    def __init__(self, *, enabled: bool, **init_kwargs: Any) -> None:
        super().__init__()
        self.enabled = enabled
        self.init_kwargs = init_kwargs
        self.run = None

    def init(self, state: State, logger: Logger) -> None:
        if self.enabled and self.run is None:
            import wandb

            self.run = wandb.init(**self.init_kwargs)

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.config.update(hyperparameters, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: _scalar(v) for k, v in metrics.items()}, step=step)

    def post_close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


# ---- the trainer ------------------------------------------------------------------------------------


def lambda_schedule(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """Our schedule as a LambdaLR: batch t trains with optim.lr * schedule(t), as in the Lightning path.

    LambdaLR counts its own steps (saved in Composer's checkpoint); a plain function keeps the
    schedule itself out of the checkpoint, so a resumed run follows the config it was started with.
    """

    def multiplier(step: int) -> float:
        return schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _fsdp_config(plan: RunPlan) -> Any:
    from composer.utils.parallelism import FSDP2Config

    precision = plan.precision
    if precision.name == "fp32" or precision.param_dtype is None:
        mixed = "FULL"  # fp32 parameters in compute
    elif precision.reduce_dtype == torch.float32:
        mixed = "DEFAULT"  # bf16 compute, fp32 gradient reduction
    else:
        mixed = "PURE"
    return FSDP2Config(
        reshard_after_forward=plan.parallel.reshard_after_forward,
        activation_checkpointing=False,  # applied by mptlike.parallel before sharding, as in the Lightning path
        state_dict_type="sharded",
        mixed_precision=mixed,
    )


def build_model(plan: RunPlan, device: torch.device) -> MPTForCausalLM:
    """The model as the Lightning path builds it: meta, checkpointing/compile, then materialized and seeded.

    With FSDP2 (world > 1), "rank0" init materializes the whole model on rank 0's CPU and Composer
    broadcasts it into the shards; "sharded" init leaves every rank on meta and Composer calls
    `ComposerMPT.param_init_fn` per module once the shards are allocated (on CUDA).
    """
    from mptlike.parallel import apply_activation_checkpointing, apply_compile, materialize, resolve_init_mode

    with torch.device("meta"):
        model = MPTForCausalLM(plan.model_config)
    apply_activation_checkpointing(model, plan.parallel.ac_mode, plan.parallel.ac_every)
    if plan.parallel.compile:
        apply_compile(model)
    world, rank = plan.world.world_size, plan.world.rank
    if world == 1:
        materialize(model, device, seed=plan.cfg.seed)
        return model
    if resolve_init_mode(plan.cfg.parallel.init, device, world) == "rank0" and rank == 0:
        materialize(model, torch.device("cpu"), seed=plan.cfg.seed)
    return model


def _keep_config_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, peak_lr: float
) -> Callable[[], None]:
    """Returns a function that, after a checkpoint was loaded, puts the config's hyperparameters back.

    Loading restores param groups and the schedule's base rates as they were saved; as in the
    Lightning path, moments and the step come from the checkpoint, hyperparameters from the config.
    """
    saved = [{k: g[k] for k in ("betas", "eps", "weight_decay") if k in g} for g in optimizer.param_groups]

    def restore() -> None:
        multiplier = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group, values in zip(optimizer.param_groups, saved, strict=True):
            group.update(values, initial_lr=peak_lr, lr=peak_lr * multiplier)
        scheduler.base_lrs = [peak_lr] * len(optimizer.param_groups)

    return restore


def _eval_dataloader(plan: RunPlan, rank: int, world: int) -> DataLoader | None:
    from mptlike.data import Manifest, TokenDataset

    cfg, seq_len = plan.cfg, plan.model_config.max_seq_len
    if not (cfg.eval.every_n_steps or cfg.eval.at_end):
        return None
    if Manifest.load(plan.data.path).num_tokens.get("val", 0) <= seq_len:
        log.warning("%s has no usable val split: validation is skipped", plan.data.path)
        return None
    val = TokenDataset(plan.data.path, "val", seq_len=seq_len,
                       with_sequence_id=plan.model_config.attn_uses_sequence_id)
    # The same first samples as mptlike.train.evaluate: rank r scores r, r + W, r + 2W, ...
    per_rank = min(cfg.eval.max_samples, len(val)) // world
    if per_rank == 0:
        return None
    indices = list(range(rank, per_rank * world, world))
    return DataLoader(_EvalBatches(val, indices, cfg.trainer.micro_batch_size), batch_size=None, num_workers=0)


class _EvalBatches(IterableDataset):
    """This rank's validation samples in micro-batches; an iterable, as each rank already has its own share."""

    def __init__(self, dataset: Any, indices: list[int], batch_size: int) -> None:
        super().__init__()
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size

    def __len__(self) -> int:
        # Composer needs the number of evaluation batches to know when an evaluation ends.
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.dataset.get_batch(self.indices[start : start + self.batch_size])


def _every(n: int, max_steps: int, at_end: bool) -> Callable[[State, Event], bool]:
    """A Composer interval: at BATCH_END/BATCH_CHECKPOINT of every n-th step (n=0: never) and the last."""

    def due(state: State, event: Event) -> bool:
        if event not in (Event.BATCH_END, Event.BATCH_CHECKPOINT):
            return False
        step = int(state.timestamp.batch)
        if step >= max_steps:
            return at_end
        return bool(n) and step % n == 0

    return due


def _loggers(plan: RunPlan, resume_step: int) -> list[LoggerDestination]:
    cfg = plan.cfg
    rank_zero = plan.world.rank == 0
    name, mode = cfg.logger.name, cfg.logger.mode
    if name == "none" or (name == "wandb" and mode == "disabled"):
        return []
    if name == "csv":
        from mptlike.train.loggers import METRICS_CSV, CSVMetricsLogger

        return [MetricsFile(CSVMetricsLogger(plan.run_dir / METRICS_CSV,
                                             resume_step=resume_step if rank_zero else None))]
    from mptlike.train.loggers import wandb_run_id

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    return [
        WandbDestination(
            enabled=rank_zero,
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group,
            name=cfg.logger.run_name or cfg.name,
            tags=list(cfg.logger.tags),
            mode=mode,
            dir=str(plan.run_dir),
            id=wandb_run_id(plan.run_dir, create=rank_zero),
            resume="allow",
            config=plan.config_dict,
        )
    ]


def build_composer_trainer(
    cfg_or_plan: TrainConfig | RunPlan,
    *,
    load_path: str | os.PathLike | None = None,
    resume_step: int = 0,
    callbacks: Sequence[Callback] = (),
) -> Trainer:
    """A composer.Trainer for a validated RunPlan (or a TrainConfig, validated here); call `.fit()`.

    `load_path` is a Composer checkpoint to resume from (model, optimizer, schedule, loader, RNG);
    `resume_step` its step, used to trim metrics.csv. The data folder must exist already
    (`mptlike.train.runner.ensure_data`).
    """
    from mptlike.data import TokenDataset, build_loader
    from mptlike.train.config import TrainConfig
    from mptlike.train.flops import peak_flops
    from mptlike.train.optim import build_optimizer
    from mptlike.train.plan import build_plan

    plan = build_plan(cfg_or_plan) if isinstance(cfg_or_plan, TrainConfig) else cfg_or_plan
    check_composer_plan(plan)
    cfg, world = plan.cfg, plan.world
    gpu = plan.accelerator == "gpu"
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    sharded = world.world_size > 1

    model = build_model(plan, device)
    composer_model = ComposerMPT(model)
    o = cfg.optim
    optimizer = build_optimizer(
        model, name=o.name, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
        impl=o.impl, device_type=device.type,
    )
    scheduler = lambda_schedule(optimizer, plan.schedule)
    restore_hyperparameters = _keep_config_hyperparameters(optimizer, scheduler, o.lr)

    seq_len = plan.model_config.max_seq_len
    train = TokenDataset(plan.data.path, "train", seq_len=seq_len,
                         with_sequence_id=plan.model_config.attn_uses_sequence_id)
    per_rank = cfg.trainer.global_batch_size // world.world_size
    loader = build_loader(
        train, global_batch_size=cfg.trainer.global_batch_size, micro_batch_size=per_rank, rank=world.rank,
        world_size=world.world_size, seed=cfg.seed, num_workers=cfg.data.num_workers, pin_memory=gpu,
    )

    eval_loader = _eval_dataloader(plan, world.rank, world.world_size)
    evaluators = None
    if eval_loader is not None:
        from composer.core import Evaluator

        evaluators = Evaluator(
            label=EVAL_LABEL,
            dataloader=eval_loader,
            metric_names=[CE_METRIC, PPL_METRIC],
            eval_interval=_every(cfg.eval.every_n_steps, cfg.trainer.max_steps, cfg.eval.at_end),
            device_eval_microbatch_size=cfg.trainer.micro_batch_size,
        )

    from composer.callbacks import LRMonitor, SpeedMonitor

    peak = peak_flops(cfg.trainer.peak_flops, device)
    step_metrics = TrainStep(
        grad_clip=o.grad_clip,
        max_nonfinite_steps=cfg.trainer.max_nonfinite_steps,
        max_steps=cfg.trainer.max_steps,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        tokens_per_step=plan.tokens_per_step,
        flops_per_token=composer_model._flops_per_token(seq_len),
        peak_flops=peak,
    )
    ck = cfg.checkpoint
    trainer = Trainer(
        model=composer_model,
        train_dataloader=composer_dataloader(loader),
        max_duration=f"{cfg.trainer.max_steps}ba",
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        eval_dataloader=evaluators,
        callbacks=[step_metrics, MptlikeRunInfo(plan.model_config),
                   SpeedMonitor(window_size=cfg.trainer.log_every_n_steps, gpu_flops_available=peak),
                   LRMonitor(), *callbacks],
        loggers=_loggers(plan, resume_step),
        run_name=cfg.logger.run_name or cfg.name,
        progress_bar=False,
        log_to_console=False,
        load_path=None if load_path is None else str(load_path),
        save_folder=str(checkpoint_folder(plan.run_dir)),
        save_interval=_every(ck.every_n_steps, cfg.trainer.max_steps, ck.save_final),
        # Our resume rules (resume=never refuses existing checkpoints) already guard against
        # clobbering; a run resumed from an older step may rewrite the steps after it.
        save_overwrite=True,
        save_num_checkpoints_to_keep=ck.keep_last if ck.keep_last > 0 else -1,
        parallelism_config={"fsdp": _fsdp_config(plan)} if sharded else None,
        device="gpu" if gpu else "cpu",
        precision="amp_bf16" if plan.precision.name == "bf16" else "fp32",
        device_train_microbatch_size=cfg.trainer.micro_batch_size,
        # Each micro-batch counts 1/accumulation_steps, the Lightning path's weighting.
        accumulate_train_batch_on_tokens=False,
        # Composer seeds rank r with seed + r: the Lightning path's dropout seed, cfg.seed + 1 + r.
        seed=cfg.seed + 1,
        spin_dataloaders=False,
    )
    if load_path is not None:
        restore_hyperparameters()
    elif plan.init_from is not None:
        from mptlike.train.checkpoint import load_pretrained_weights

        # After sharding, as the Lightning path does: rank 0 reads the file, every rank keeps its shards.
        load_pretrained_weights(trained_model(trainer), plan.init_from)
        log.info("initialized the weights from %s", plan.init_from)
    if sharded and average_gradients_where_avg_sums(trainer.state.model):
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
    from composer.utils import reproducibility

    pending = getattr(trainer, "_rng_state", None)
    if pending is not None and int(trainer.state.timestamp.batch_in_epoch) > 0:
        reproducibility.load_rng_state(pending)
        trainer._rng_state = None
