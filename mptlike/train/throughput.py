"""ThroughputMeter: tokens/s, TFLOP/s per device, MFU and memory over the steps since the last report.

Time spent evaluating and checkpointing is left out (`with meter.paused():`). On CUDA the clock
is read after a synchronize, so queued kernels are counted. The first `warmup_steps` steps after
the meter starts (a fresh start or a resume: a new process) are left out of the first window too:
they compile, autotune and allocate, and would drag the first tokens/s and MFU down. A window that
holds nothing but warm-up steps reports them, so every report has numbers.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator

import torch

from mptlike.train.flops import mfu


class ThroughputMeter:
    def __init__(self, *, flops_per_token: int, peak_flops: float | None, tokens_per_step: int,
                 samples_per_step: int, world_size: int, device: torch.device, warmup_steps: int = 1) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.tokens_per_step = tokens_per_step
        self.samples_per_step = samples_per_step
        self.world_size = world_size
        self.device = device
        self._warmup_left = warmup_steps
        self._warmup: tuple[float, int] | None = None  # (seconds, steps) of the warm-up, until reported
        self.restart()

    def restart(self) -> None:
        """Start a new window now (after setup, a resume or a rollback)."""
        self._start = time.perf_counter()
        self._paused = 0.0
        self._steps = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    def step(self) -> None:
        self._steps += 1
        if self._warmup_left > 0:
            self._warmup_left -= 1
            seconds, steps = self._warmup or (0.0, 0)
            self._warmup = (seconds + self._elapsed(), steps + self._steps)  # a sync point on CUDA
            self.restart()

    def _elapsed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self._start - self._paused

    def report(self) -> dict[str, float]:
        """Speed metrics of the window, then a new window. A CPU-GPU sync point on CUDA."""
        elapsed, steps = self._elapsed(), self._steps
        if steps == 0 and self._warmup is not None:
            elapsed, steps = self._warmup
        self._warmup = None
        elapsed = max(elapsed, 1e-9)
        tokens_per_sec = steps * self.tokens_per_step / elapsed
        metrics = {
            "train/tokens_per_sec": tokens_per_sec,
            "train/samples_per_sec": steps * self.samples_per_step / elapsed,
            "train/tflops_per_device": self.flops_per_token * tokens_per_sec / self.world_size / 1e12,
            "train/memory_gb": peak_memory_gb(self.device),
        }
        utilization = mfu(self.flops_per_token, tokens_per_sec / self.world_size, self.peak_flops)
        if utilization is not None:
            metrics["train/mfu"] = utilization
        self.restart()
        return metrics


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9
