"""The console display: a tqdm bar with loss, tokens/s and MFU on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys

import lightning.pytorch as pl

from mptlike.train.callbacks.throughput import ThroughputMonitor

log = logging.getLogger("mptlike.train")


class ProgressDisplay(pl.Callback):
    def __init__(self, monitor: ThroughputMonitor, *, bar: bool = True) -> None:
        self.monitor = monitor
        self.bar_enabled = bar
        self._bar = None

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.bar_enabled or not sys.stderr.isatty():
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=pl_module.plan.cfg.trainer.max_steps,
            initial=pl_module.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        result = pl_module.last
        if result is None:  # a rollback: no step was taken
            return
        latest = self.monitor.latest
        if self._bar is not None:
            postfix = {"loss": f"{result.loss:.3f}"}
            if latest:
                postfix["tok/s"] = f"{latest['train/tokens_per_sec']:,.0f}"
                postfix["mfu"] = f"{latest['train/mfu']:.1%}" if "train/mfu" in latest else "n/a"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)
        elif latest and result.step % pl_module.plan.cfg.trainer.log_every_n_steps == 0:
            mfu = f"{latest['train/mfu']:.1%}" if "train/mfu" in latest else "n/a"
            log.info(
                "step %d/%d | loss %.4f | lr %.2e | %s tok/s | mfu %s",
                result.step,
                pl_module.plan.cfg.trainer.max_steps,
                result.loss,
                result.lr,
                f"{latest['train/tokens_per_sec']:,.0f}",
                mfu,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
