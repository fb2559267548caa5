"""What a finished (or preempted) run reports back to the command line, whichever backend trained it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RunResult:
    final_step: int
    steps_run: int = 0
    wall_seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    export_dir: Path | None = None
    sample: str | None = None
    is_rank_zero: bool = True
    preempted_by: str | None = None  # the signal that stopped the run early (SIGTERM, SIGUSR1, SIGINT)
    checkpoint: Path | None = None  # the checkpoint written on preemption
