"""Preemption: SIGTERM (SLURM, Kubernetes), SIGUSR1 (SLURM's warning signal) and SIGINT (Ctrl-C).

`mptlike.train.run` owns these signals for the whole run, in two phases:
- before training starts (data preparation, rendezvous, building and loading): there is nothing to
  save, so a signal stops the run at once (`StoppedBeforeStart`; the command exits 130);
- once the backend calls `arm()`, a signal only raises a flag. The loop reads it with the loss
  all-reduce it does anyway, so every rank learns at the same step that one of them was signalled;
  then every rank finishes that step, writes a complete checkpoint of it, and the command exits 3.
  A second signal while that happens changes nothing (a second Ctrl-C says that a third one aborts
  without the checkpoint, which leaves the older checkpoints intact).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
OTHER_RANK = "a signal to another rank"  # what a rank that was not signalled itself reports


class StoppedBeforeStart(BaseException):
    """A signal arrived before the first step: nothing was trained, nothing needs saving. A
    BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.signal_name = name


class Preemption:
    """A context manager owning SIGNALS; after `arm()`, `requested` is the first signal's name."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        # Python delivers signals to the main thread only; elsewhere (a notebook's worker thread)
        # the process keeps its own handlers.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def arm(self) -> None:
        """Training has started: from now on a signal asks for a checkpoint and a clean stop."""
        self.armed = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise StoppedBeforeStart(name)
        if self.requested is None:
            self.requested = name
            log.warning("%s received: finishing this step and writing a checkpoint before exiting", name)
        elif signum == signal.SIGINT and self._previous:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            log.warning("SIGINT received again: the checkpoint is being written; a third Ctrl-C aborts without it "
                        "(the older checkpoints stay intact)")
        else:
            log.warning("%s received again: still writing the checkpoint, exiting when it is complete", name)
