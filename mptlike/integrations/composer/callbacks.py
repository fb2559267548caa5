"""What Composer runs around each step, as Callbacks: the Lightning loop's step, metrics and preemption.

TrainStep does, at Composer's events, what mptlike.train.loop does inside its step:

    BATCH_START        read this step's lr; MPTLIKE_FAULTS: is this global batch poisoned, is a signal due?
    AFTER_LOSS         (per micro-batch) the test-only NaN; sum the micro-batch losses
    AFTER_TRAIN_BATCH  one all-reduce of the loss and of "did any rank get a signal"; clip; the
                       NonFiniteGuard's verdict (skip: drop every gradient, so Composer's
                       optimizer.step() leaves weights and moments untouched)
    BATCH_END          log train/ metrics (throughput every log_every_n_steps); on a signal,
                       stop: Composer finishes this step, and the save interval says "save now"
    EVAL_START/END     pause the throughput clock; log val/loss and val/perplexity

The guard's state (events, positions) travels in every Composer checkpoint as this callback's state.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from mptlike import faults
from mptlike.data import ResumableLoader
from mptlike.integrations.composer.checkpoints import RUN_INFO_CONFIG, RUN_INFO_VERSION
from mptlike.integrations.composer.model import CE_METRIC
from mptlike.model import MPTConfig
from mptlike.train.guard import Action, NonFiniteGuard, append_jsonl, batch_sample_ids
from mptlike.train.loggers import Loggers
from mptlike.train.signals import Preemption
from mptlike.train.step import reduce_and_clip
from mptlike.train.throughput import ThroughputMeter

log = logging.getLogger(__name__)

# The metric families both backends write; Composer's own (time/, loss/train/total, ...) stay in Composer.
OUR_METRICS = ("train/", "val/", "guard/")


class TrainStep(Callback):
    """Guard, clip, log and watch for preemption, step by step, as the Lightning loop does."""

    def __init__(self, *, loader: ResumableLoader, guard: NonFiniteGuard, meter: ThroughputMeter,
                 preemption: Preemption, grad_clip: float, max_steps: int, log_every_n_steps: int,
                 tokens_per_step: int, samples_log: Path | None = None) -> None:
        self.loader = loader
        self.guard = guard
        self.meter = meter
        self.preemption = preemption
        self.grad_clip = grad_clip
        self.max_steps = max_steps
        self.log_every_n_steps = log_every_n_steps
        self.tokens_per_step = tokens_per_step
        self.samples_log = samples_log  # run_dir/samples.jsonl on rank 0 with debug.log_sample_ids, else None
        self.losses: dict[int, float] = {}  # optimizer step (1-based) -> mean loss over the global batch
        self.val: dict[str, float] = {}
        self.stopping = False  # a signal reached some rank: this step is the last, and it is saved
        self._lr = 0.0
        self._position = 0
        self._poisoned = False
        self._loss_sum: torch.Tensor | None = None
        self._micro_batches = 0
        self._loss = self._grad_norm = float("nan")
        self._action = Action.STEP
        self._eval_pause: AbstractContextManager | None = None

    # The guard's counters and positions are part of the run's state.
    def state_dict(self) -> dict[str, Any]:
        return {"guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.guard.load_state_dict(state.get("guard", {}))

    def fit_start(self, state: State, logger: Logger) -> None:
        self.meter.restart()

    def batch_start(self, state: State, logger: Logger) -> None:
        # The scheduler steps after the batch: read the rate this batch uses now.
        self._lr = state.optimizers[0].param_groups[0]["lr"]
        # The loader counted this global batch when it handed it out.
        self._position = self.loader.samples_consumed - self.loader.global_batch_size
        self._poisoned = faults.active().poisons(self._position, self.loader.global_batch_size)
        faults.active().maybe_signal(int(state.timestamp.batch) + 1, dist.get_global_rank())
        self._loss_sum = None
        self._micro_batches = 0

    def after_loss(self, state: State, logger: Logger) -> None:
        if self._poisoned:
            state.loss = state.loss * float("nan")  # Composer's backward uses state.loss from here on
        loss = state.loss.detach().float().reshape(())
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro_batches += 1

    def after_train_batch(self, state: State, logger: Logger) -> None:
        self._loss, self._grad_norm, stop = reduce_and_clip(
            state.model, self._loss_sum, micro_batches=self._micro_batches,
            stop_requested=self.preemption.requested is not None, grad_clip=self.grad_clip)
        step = int(state.timestamp.batch) + 1
        self._action = self.guard.check(step=step, loss=self._loss, grad_norm=self._grad_norm,
                                        position=self._position, ids_of=self._ids_of)
        if self._action is not Action.STEP:
            logger.log_metrics({"guard/nonfinite_step": 1.0}, step=step)
            for p in state.model.parameters():
                p.grad = None  # Composer steps the optimizer next: with no gradients it changes nothing
        # A signal at the last step: the run ends normally, with its export.
        self.stopping = stop > 0 and step < self.max_steps

    def _ids_of(self, position: int) -> list[int]:
        loader = self.loader
        return batch_sample_ids(position, loader.global_batch_size, loader.num_samples, loader.seed)

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        self.losses[step] = self._loss
        self.meter.step()
        if self.samples_log is not None:
            append_jsonl(self.samples_log, {"step": step, "samples": self._ids_of(self._position)})
        metrics = {"train/loss": self._loss, "train/lr": self._lr, "train/grad_norm": self._grad_norm}
        if step % self.log_every_n_steps == 0 or step == self.max_steps:
            metrics.update(self.meter.report(), **{"train/tokens_seen": float(step * self.tokens_per_step)})
        if self._action is Action.SKIP:
            metrics["train/skipped_step"] = 1.0
        logger.log_metrics(metrics, step=step)
        if self.stopping:
            # Composer still runs this step's BATCH_CHECKPOINT (the save interval sees `stopping`), then ends fit().
            state.stop_training()

    def eval_start(self, state: State, logger: Logger) -> None:
        self._eval_pause = self.meter.paused()
        self._eval_pause.__enter__()

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._eval_pause is not None:
            self._eval_pause.__exit__(None, None, None)
            self._eval_pause = None
        values = state.eval_metric_values
        if CE_METRIC not in values:
            return
        loss = float(values[CE_METRIC])
        self.val = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 80.0))}
        step = int(state.timestamp.batch)
        logger.log_metrics(self.val, step=step)
        log.info("step %d: val/loss %.4f, val/perplexity %.2f", step, loss, self.val["val/perplexity"])


class PausingCheckpointSaver(CheckpointSaver):
    """Composer's CheckpointSaver, with the time it spends saving left out of the throughput numbers."""

    def __init__(self, meter: ThroughputMeter, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.meter = meter

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        with self.meter.paused():
            super().batch_checkpoint(state, logger)


class MptlikeRunInfo(Callback):
    """Puts the model config into every Composer checkpoint, so its weights convert without the run folder."""

    def __init__(self, model_config: MPTConfig) -> None:
        self.model_config = model_config

    def state_dict(self) -> dict[str, Any]:
        # One JSON string survives both checkpoint formats (a pickled file, sharded DCP) unchanged.
        return {"version": RUN_INFO_VERSION, RUN_INFO_CONFIG: json.dumps(self.model_config.to_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # the config of the run being resumed comes from the command line, as in the Lightning loop


class MptlikeMetrics(LoggerDestination):
    """Our train/, val/ and guard/ metrics into mptlike's loggers (metrics.csv, W&B, console), as the loop logs them.

    Composer's own metrics (time/, loss/train/total, ...) are not forwarded: both backends write the same names.
    """

    def __init__(self, loggers: Loggers) -> None:
        super().__init__()
        self.loggers = loggers
        self._closed = False

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        ours = {k: _scalar(v) for k, v in metrics.items() if k.startswith(OUR_METRICS)}
        if ours and step is not None:
            self.loggers.log(ours, step)

    def post_close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loggers.close()


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def every(n: int, max_steps: int, at_end: bool, *, unless: Callable[[], bool] = lambda: False,
          also: Callable[[], bool] = lambda: False) -> Callable[[State, Any], bool]:
    """A Composer interval: due at each n-th step (n=0: never) and at max_steps when `at_end`.

    `also()` makes any step due (a checkpoint on preemption); `unless()` none (no evaluation then).
    """

    def due(state: State, event: Event) -> bool:
        if event not in (Event.BATCH_END, Event.BATCH_CHECKPOINT) or unless():
            return False
        if also():
            return True
        step = int(state.timestamp.batch)
        if step >= max_steps:
            return at_end
        return bool(n) and step % n == 0

    return due
