"""Preemption: SIGTERM (SLURM, Kubernetes), SIGUSR1 (SLURM's warning signal) and SIGINT (Ctrl-C).

A signal only raises a flag. The loop reads it once per step, together with the loss all-reduce
it already does, so every rank learns that one of them was signalled at the same step; then every
rank finishes that step, writes a complete checkpoint of it, and the command exits with
EXIT_PREEMPTED. A second signal while the checkpoint is written changes nothing: the checkpoint
completes (kill -9 instead loses only that unfinished checkpoint, never an older one).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
OTHER_RANK = "a signal to another rank"  # what a rank that was not signalled itself reports


class Preemption:
    """A context manager that turns SIGNALS into `requested` (the first signal's name, or None)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        # Python delivers signals to the main thread only; elsewhere (a notebook's worker thread)
        # the process keeps its own handlers.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.requested is not None:
            # The process is on its way out (checkpoint written, teardown and the one line to come).
            # Under torchrun the first rank to exit makes torchrun SIGTERM the others: keep taking
            # signals, so that they finish tearing down and report as well.
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            log.warning("%s received: finishing this step and writing a checkpoint before exiting", name)
        else:
            log.warning("%s received again: still writing the checkpoint, exiting when it is complete", name)
