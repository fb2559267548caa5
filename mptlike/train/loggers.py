"""Metric sinks: run_dir/metrics.csv, Weights & Biases, or nothing.

The CSV file is rewritten atomically whenever a new metric name appears (e.g. the first
`val/loss`), and on resume the rows after the resumed step are dropped, so the file always
describes one consistent trajectory.
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only


METRICS_CSV = "metrics.csv"
WANDB_ID_FILE = "wandb_run_id"


class CSVMetricsLogger(Logger):
    """One row per logged step: a `step` column, then every metric name seen so far."""

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            self._load_until(resume_step)

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    def _load_until(self, step: int) -> None:
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            self._columns = list(reader.fieldnames or ["step"])
            self._rows = [row for row in reader if row.get("step") and int(row["step"]) <= step]
        self._rewrite()

    @rank_zero_only
    def truncate(self, step: int) -> None:
        """Drop the rows after `step` (a rollback trains those steps again)."""
        self._rows = [row for row in self._rows if int(row["step"]) <= step]
        self._rewrite()

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is saved as run_dir/config.yaml

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        values = {k: _fmt(v) for k, v in metrics.items()}
        new = [k for k in metrics if k not in self._columns]
        if self._rows and str(self._rows[-1]["step"]) == str(step):
            # Several reports for one step (validation, then training metrics) share its row.
            self._rows[-1].update(values)
            self._columns.extend(new)
            self._rewrite()
            return
        row = {"step": step, **values}
        self._rows.append(row)
        if new or not self.path.is_file():
            self._columns.extend(new)
            self._rewrite()
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow(row)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns)
        writer.writeheader()
        writer.writerows(self._rows)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, self.path)


def _fmt(value: Any) -> Any:
    # repr keeps every bit of a float, so runs can be compared exactly from the file.
    return repr(float(value)) if isinstance(value, float) else value


def wandb_run_id(run_dir: Path, *, create: bool) -> str | None:
    """A stable W&B run id per run_dir, so a resumed run continues the same W&B run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if not create:
        return None
    run_id = uuid.uuid4().hex[:12]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def build_loggers(
    *,
    name: str,
    mode: str,
    run_dir: Path,
    run_name: str,
    project: str,
    entity: str | None,
    group: str | None,
    tags: list[str],
    config: dict[str, Any],
    resume_step: int | None,
    is_rank_zero: bool,
) -> list[Logger]:
    if name == "none" or (name == "wandb" and mode == "disabled"):
        return []
    if name == "csv":
        return [CSVMetricsLogger(run_dir / METRICS_CSV, resume_step=resume_step if is_rank_zero else None)]
    from lightning.pytorch.loggers import WandbLogger

    run_dir.mkdir(parents=True, exist_ok=True)
    return [
        WandbLogger(
            name=run_name,
            project=project,
            entity=entity,
            group=group,
            tags=list(tags),
            save_dir=str(run_dir),
            id=wandb_run_id(run_dir, create=is_rank_zero),
            resume="allow",
            mode=mode,
            config=config,
        )
    ]
