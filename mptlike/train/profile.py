"""debug.profile_steps=[a, b]: a torch.profiler trace of optimizer steps a..b on every rank.

Each rank writes run_dir/profile/rank{R}/trace-steps{a}-{b}.json, a Chrome trace (open it in
Perfetto, https://ui.perfetto.dev, or chrome://tracing) in which every step is a `ProfilerStep#N`
span named by its training step. On CUDA the same folder gets memory-snapshot-steps{a}-{b}.pickle
(torch.cuda.memory._dump_snapshot; drop it on https://pytorch.org/memory_viz); on CPU there is no
allocator history to record, so no snapshot is written.

A span covers the step's forward/backward, the loss all-reduce, clipping, the optimizer step and
the metrics; validation and checkpoints between steps are outside it. A resumed run profiles the
steps of a..b it runs; a run that stops inside the range writes what it recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"


def profile_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / PROFILE_DIR / f"rank{rank}"


class StepProfiler:
    """Started before step a, stepped between steps, stopped (and written) after step b or on close()."""

    def __init__(self, steps: list[int] | None, run_dir: Path, *, rank: int, device: torch.device) -> None:
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.folder = profile_dir(run_dir, rank)
        self.cuda = device.type == "cuda"
        self._prof: torch.profiler.profile | None = None
        self._done = not steps

    @property
    def trace_path(self) -> Path:
        return self.folder / f"trace-steps{self.first}-{self.last}.json"

    @property
    def snapshot_path(self) -> Path:
        return self.folder / f"memory-snapshot-steps{self.first}-{self.last}.pickle"

    def step_starts(self, step: int) -> None:
        """Call before training step `step` (1-based); starts the profiler at the first step in range."""
        if self._done or self._prof is not None or not self.first <= step <= self.last:
            return
        from torch.profiler import ProfilerAction, ProfilerActivity, profile

        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # A schedule that always records: it makes the profiler mark each step as ProfilerStep#N.
        self._prof = profile(activities=activities, schedule=lambda _: ProfilerAction.RECORD,
                             on_trace_ready=self._write_trace, record_shapes=True, profile_memory=True,
                             with_stack=False)
        self._prof.step_num = step  # the first span is named after the training step it covers
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._prof.start()

    def step_ended(self, step: int) -> None:
        """Call after training step `step`: the next span opens, or after step b the trace is written."""
        if self._prof is None:
            return
        if step >= self.last:
            self.close()
        else:
            self._prof.step()

    def close(self) -> None:
        """Stop and write what was recorded (also when the run stops inside the range). Idempotent."""
        prof, self._prof = self._prof, None
        self._done = True
        if prof is None:
            return
        prof.stop()  # on_trace_ready writes the trace
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.snapshot_path))
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("memory snapshot of steps %d-%d: %s", self.first, self.last, self.snapshot_path)

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(self.trace_path))
        log.info("profiler trace of steps %d-%d: %s", self.first, self.last, self.trace_path)
