"""Training metrics every `trainer.log_every_n_steps` steps: loss, lr, grad norm, speed, MFU, memory.

Speed is measured over the window since the last report, excluding time spent evaluating and
checkpointing. On CUDA the clock is read after a synchronize, so queued kernels are counted.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning.pytorch as pl
import torch

from mptlike.train.flops import mfu


class ThroughputMonitor(pl.Callback):
    def __init__(self, *, flops_per_token: int, peak_flops: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.latest: dict[str, float] = {}
        self._window_start = 0.0
        self._window_overhead = 0.0
        self._window_steps = 0

    def _restart(self, module) -> None:
        self._window_start = time.perf_counter()
        self._window_overhead = module.overhead_seconds
        self._window_steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        # The first window starts at the first step, after setup, data loading and resume.
        if batch_idx == 0:
            self._restart(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        result = pl_module.last
        if result is None:  # a rollback: no step was taken
            self._restart(pl_module)
            return
        self._window_steps += 1
        plan = pl_module.plan
        every = plan.cfg.trainer.log_every_n_steps
        if result.step % every and result.step != plan.cfg.trainer.max_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._window_start - (pl_module.overhead_seconds - self._window_overhead)
        elapsed = max(elapsed, 1e-9)
        world = trainer.world_size
        tokens_per_sec = self._window_steps * plan.tokens_per_step / elapsed
        metrics = {
            "train/loss": result.loss,
            "train/lr": result.lr,
            "train/grad_norm": result.grad_norm,
            "train/tokens_per_sec": tokens_per_sec,
            "train/samples_per_sec": self._window_steps * plan.cfg.trainer.global_batch_size / elapsed,
            "train/tflops_per_device": self.flops_per_token * tokens_per_sec / world / 1e12,
            "train/tokens_seen": float(pl_module.tokens_seen),
            "train/memory_gb": _peak_memory_gb(pl_module.device),
        }
        utilization = mfu(self.flops_per_token, tokens_per_sec / world, self.peak_flops)
        if utilization is not None:
            metrics["train/mfu"] = utilization
        if result.skipped:
            metrics["train/skipped_step"] = 1.0
        self.latest = metrics
        pl_module.log_metrics(metrics, result.step)
        self._restart(pl_module)


def _peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9
