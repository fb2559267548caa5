"""Where metrics go: run_dir/metrics.csv, Weights & Biases, and the console (rank 0 only).

Every sink has `log(metrics, step)`, `truncate(step)` (a resume or rollback trains the steps
after `step` again) and `close()`. Both backends use these same sinks.
The CSV file is rewritten atomically whenever a new metric name appears (e.g. the first
`val/loss`), and on resume the rows after the resumed step are dropped, so the file always
describes one consistent trajectory.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mptlike.files import atomic_write
from mptlike.train.layout import METRICS_CSV, WANDB_ID

log = logging.getLogger("mptlike.train")



class MetricsSink(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...
    def truncate(self, step: int) -> None: ...
    def close(self) -> None: ...


class CSVLogger:
    """One row per logged step: a `step` column, then every metric name seen so far."""

    def __init__(self, path: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or ["step"])
                self._rows = list(reader)
            self.truncate(resume_step)

    def truncate(self, step: int) -> None:
        self._rows = [row for row in self._rows if row.get("step") and int(row["step"]) <= step]
        self._rewrite()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        values = {k: _fmt(v) for k, v in metrics.items()}
        new = [k for k in metrics if k not in self._columns]
        self._columns.extend(new)
        if self._rows and str(self._rows[-1]["step"]) == str(step):
            # Several reports for one step (validation, then training metrics) share its row.
            self._rows[-1].update(values)
            self._rewrite()
            return
        row = {"step": step, **values}
        self._rows.append(row)
        if new or not self.path.is_file():
            self._rewrite()
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow(row)

    def close(self) -> None:
        pass

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns)
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write(self.path, buf.getvalue())


def _fmt(value: Any) -> Any:
    # repr keeps every bit of a float, so runs can be compared exactly from the file.
    return repr(float(value)) if isinstance(value, float) else value


def wandb_run_id(run_dir: Path) -> str:
    """A stable W&B run id per run_dir, so a resumed run continues the same W&B run."""
    path = run_dir / WANDB_ID
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write(path, run_id + "\n")
    return run_id


class WandbLogger:
    """Weights & Biases through the wandb API itself; metrics are plotted against `trainer/global_step`."""

    STEP_METRIC = "trainer/global_step"

    def __init__(self, *, run_dir: Path, mode: str, run_name: str, project: str, entity: str | None,
                 group: str | None, tags: list[str], config: dict[str, Any], log_model: bool = False) -> None:
        import wandb  # a heavy import, only for logger=wandb

        self.log_model_enabled = log_model
        run_dir.mkdir(parents=True, exist_ok=True)
        # W&B's files go under run_dir unless WANDB_DIR says where (the run id stays in run_dir).
        self.run = wandb.init(dir=os.environ.get("WANDB_DIR") or str(run_dir), mode=mode, id=wandb_run_id(run_dir),
                              resume="allow", name=run_name, project=project, entity=entity, group=group,
                              tags=list(tags), config=config)
        # A step metric of our own (not W&B's monotonic _step) lets a resumed run log its steps again.
        self.run.define_metric(self.STEP_METRIC)
        self.run.define_metric("*", step_metric=self.STEP_METRIC, step_sync=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log({**metrics, self.STEP_METRIC: step})

    def truncate(self, step: int) -> None:
        pass  # W&B keeps history; replayed steps are logged again under the same step numbers

    def log_model(self, folder: Path, step: int) -> None:
        """The exported model folder as an artifact of type `model` (`logger.log_model=true`)."""
        import wandb

        artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"step": step})
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])

    def close(self) -> None:
        import wandb

        self.run.finish()
        # teardown stops W&B's service process, which is what flushes an offline run's file completely.
        wandb.teardown()


class ConsoleProgress:
    """A tqdm bar on a terminal, a log line otherwise, every report (trainer.log_every_n_steps and
    the last step): loss, lr, gradient norm, tokens/s, MFU and peak memory."""

    def __init__(self, *, max_steps: int, start_step: int, bar: bool) -> None:
        self.max_steps = max_steps
        self._bar = None
        if bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if "train/loss" not in metrics:
            return
        speed = f"{metrics['train/tokens_per_sec']:,.0f}" if "train/tokens_per_sec" in metrics else None
        mfu = f"{metrics['train/mfu']:.1%}" if "train/mfu" in metrics else "n/a"
        grad_norm = f"{metrics['train/grad_norm']:.3f}" if "train/grad_norm" in metrics else "n/a"
        memory = f"{metrics['train/memory_gb']:.2f} GB" if "train/memory_gb" in metrics else "n/a"
        if self._bar is not None:
            postfix = {"loss": f"{metrics['train/loss']:.3f}", "grad": grad_norm}
            if speed:
                postfix.update({"tok/s": speed, "mfu": mfu, "mem": memory})
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step - self._bar.n)
        elif speed:
            log.info("step %d/%d | loss %.4f | lr %.2e | grad norm %s | %s tok/s | mfu %s | memory %s", step,
                     self.max_steps, metrics["train/loss"], metrics["train/lr"], grad_norm, speed, mfu, memory)

    def truncate(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Loggers:
    """All sinks of this rank as one; ranks other than 0 have none."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def truncate(self, step: int) -> None:
        for sink in self.sinks:
            sink.truncate(step)

    def log_model(self, folder: Path, step: int) -> None:
        """Hand the exported model to the sinks that store models (W&B with logger.log_model)."""
        for sink in self.sinks:
            if isinstance(sink, WandbLogger) and sink.log_model_enabled:
                sink.log_model(folder, step)

    def close(self) -> None:
        """Close every sink once; a second call does nothing."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def build_loggers(cfg: Any, *, run_dir: Path, config: dict[str, Any], start_step: int, is_rank_zero: bool,
                  console: bool = True) -> Loggers:
    """The sinks `cfg.logger` asks for, plus the console; `start_step` trims a resumed run's metrics.csv."""
    if not is_rank_zero:
        return Loggers([])
    sinks: list[MetricsSink] = []
    if console:
        sinks.append(ConsoleProgress(max_steps=cfg.trainer.max_steps, start_step=start_step,
                                     bar=cfg.trainer.progress_bar))
    name, mode = str(cfg.logger.name), str(cfg.logger.mode)
    if name == "csv":
        sinks.append(CSVLogger(run_dir / METRICS_CSV, resume_step=start_step))
    elif name == "wandb" and mode != "disabled":
        lg = cfg.logger
        sinks.append(WandbLogger(run_dir=run_dir, mode=mode, run_name=lg.run_name or cfg.name, project=lg.project,
                                 entity=lg.entity, group=lg.group, tags=list(lg.tags), config=config,
                                 log_model=bool(lg.log_model)))
    return Loggers(sinks)
