"""`mptlike-train -m` (--multirun): Hydra's basic sweeper and launcher, without Hydra's job runtime.

    mptlike-train -m optim.lr=1e-3,3e-4 model=mpt-tiny,mpt-125m

runs every combination of the swept values (four jobs here; the last swept key changes fastest, as in
Hydra), one after another in this process, each in a run folder of its own under the sweep root:

    ROOT/multirun.yaml   the command line, and for each job its overrides, run_dir, status and exit code
    ROOT/0/ ... ROOT/3/  the jobs' run folders (config.yaml, metrics.csv, checkpoints/, final/)

ROOT is run_dir= (or hydra.sweep.dir=) when the command line gives it, else
runs/multirun/YYYY-MM-DD/HH-MM-SS. Every job is composed, validated and planned before the first one
starts, so a bad value in the third job stops the sweep before anything is written. Jobs go on after a
failed one; a preempted or interrupted job stops the sweep. The same command with the same run_dir goes
on with a stopped sweep: finished jobs have nothing left to train, a preempted one resumes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mptlike.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, MptlikeError, short_error
from mptlike.files import atomic_write
from mptlike.train.config import SweepJob, parse_overrides
from mptlike.train.redact import redact

MANIFEST = "multirun.yaml"
DEFAULT_ROOT = "runs/multirun"


def split_sweep_root(overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """The sweep root that run_dir= gives (None: not given) and the other overrides."""
    root, rest = None, []
    for text, override in zip(overrides, parse_overrides(overrides)):
        if override.key_or_group != "run_dir" or override.package is not None:
            rest.append(text)
        elif override.is_sweep_override():
            raise MptlikeError(f"{text}: with -m, run_dir is the sweep root (job N runs in run_dir/N) and cannot "
                               f"be swept; run one sweep per root")
        else:
            root = None if override.is_delete() else str(override.value()).rstrip("/") or "/"
    return root, rest


def default_root(now: float | None = None) -> str:
    """runs/multirun/YYYY-MM-DD/HH-MM-SS (relative, like the default run_dir), a free folder."""
    stamp = time.localtime(time.time() if now is None else now)
    root = f"{DEFAULT_ROOT}/{time.strftime('%Y-%m-%d', stamp)}/{time.strftime('%H-%M-%S', stamp)}"
    candidate, n = root, 1
    while Path(candidate).exists():
        n += 1
        candidate = f"{root}_{n}"
    return candidate


STATUS = {0: "succeeded", EXIT_PREEMPTED: "preempted", EXIT_INTERRUPTED: "interrupted"}


def status_of(code: int) -> str:
    return STATUS.get(code, "failed")


@dataclass
class Manifest:
    """ROOT/multirun.yaml, rewritten (atomically) as each job starts and ends."""

    root: Path
    command: str  # the command line, as a shell reads it
    jobs: list[SweepJob]
    run_dirs: list[str]
    status: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.status = [{"status": "pending", "exit_code": None} for _ in self.jobs]

    def set(self, number: int, status: str, exit_code: int | None = None) -> None:
        self.status[number] = {"status": status, "exit_code": exit_code}
        self.write()

    def write(self) -> None:
        import yaml

        data = {
            "command": self.command,
            "jobs": [
                {"job": n, "overrides": job.overrides, "swept": job.swept, "run_dir": run_dir, **state}
                for n, (job, run_dir, state) in enumerate(zip(self.jobs, self.run_dirs, self.status))
            ],
        }
        head = ("# mptlike-train -m: one job per combination of the swept values, run one after another;\n"
                "# job N's run_dir is N/ beside this file. status: pending | running | succeeded | failed | "
                "preempted | interrupted\n")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(self.root / MANIFEST, head + yaml.safe_dump(redact(data), sort_keys=False))
        except OSError as exc:
            raise MptlikeError(f"the sweep root {self.root} cannot be written ({short_error(exc)}): give a folder "
                               f"you can write to as run_dir=") from None
