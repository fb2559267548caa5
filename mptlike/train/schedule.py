"""Learning-rate schedules as plain functions of the step, and the object that applies them.

Semantics follow Composer's schedulers, which llm-foundry's MPT runs used: the multiplier at
optimizer step t (0-based) is t / warmup during warmup, then decays from 1 to alpha_f at
t = max_steps: cosine  alpha_f + (1 - alpha_f) * (1 + cos(pi * f)) / 2,  linear  1 + (alpha_f - 1) * f,
constant  1, with f = (t - warmup) / (max_steps - warmup). Since the multiplier depends on the
step alone, the schedule's whole state is the step, which the checkpoint already holds.

Timing (`optim.lr_timing`). Composer steps its schedulers at the end of a batch, before it advances
its batch counter, so in a Composer (llm-foundry) run optimizer step t trains with the multiplier of
t - 1, and steps 0 and 1 both with that of step 0 (zero lr under warmup). `composer`, the default,
applies exactly that in both backends, so a foundry loss curve is reproduced step for step; `exact`
applies the multiplier of t at step t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mptlike.errors import MptlikeError

SCHEDULES = ("cosine", "linear", "constant")
LR_TIMINGS = ("composer", "exact")


@dataclass(frozen=True)
class Schedule:
    name: str
    max_steps: int
    warmup_steps: int = 0
    alpha_f: float = 0.1
    timing: str = "composer"

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise MptlikeError(f"optim.schedule={self.name!r} is unknown: choose one of {', '.join(SCHEDULES)}")
        if self.timing not in LR_TIMINGS:
            raise MptlikeError(f"optim.lr_timing={self.timing!r} is unknown: choose one of {', '.join(LR_TIMINGS)}")
        if self.warmup_steps < 0:
            raise MptlikeError(f"optim.warmup_steps={self.warmup_steps} is invalid: use 0 or more")
        if not 0 <= self.alpha_f <= 1:
            raise MptlikeError(f"optim.alpha_f={self.alpha_f} is invalid: the final lr fraction lies in [0, 1]")

    def __call__(self, step: int) -> float:
        """Multiplier of the peak learning rate for the optimizer step with this 0-based index."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.name == "constant":
            return 1.0
        span = self.max_steps - self.warmup_steps
        frac = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        if self.name == "cosine":
            return self.alpha_f + (1 - self.alpha_f) * 0.5 * (1 + math.cos(math.pi * frac))
        return 1 + (self.alpha_f - 1) * frac

    def for_step(self, step: int) -> float:
        """The multiplier optimizer step `step` (0-based) trains with, under this schedule's timing."""
        return self(max(step - 1, 0)) if self.timing == "composer" else self(step)


class LRScheduler:
    """Sets every param group's lr to peak_lr * schedule(step) before each optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, peak_lr: float) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.peak_lr = peak_lr

    def apply(self, step: int) -> float:
        lr = self.peak_lr * self.schedule.for_step(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            # The decoupled weight decay scales with lr / initial_lr: keep it tied to the peak.
            group["initial_lr"] = self.peak_lr
        return lr
