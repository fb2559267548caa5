"""Fault injection, for mptlike's own tests only: the one place that reads `MPTLIKE_FAULTS`.

A fault test must inject the fault for real (a NaN in the loss, a signal, a slow disk), at a
point a test cannot reach from outside. Those points ask this module; users never set it.

    MPTLIKE_FAULTS="nan_at_step=4"                 NaN loss on the global batch step 4 reads in an
                                                   uninterrupted run (passed over after a rollback)
    MPTLIKE_FAULTS="checkpoint_delay_s=3"          sleep after the shards are written, before COMPLETE
                                                   (the Lightning backend's Checkpointer)
    MPTLIKE_FAULTS="signal_at_step=3,signal=TERM,signal_rank=1"
                                                   as step 3 starts, that rank sends itself the signal
                                                   (signal_at_step=0: during setup, before step 1)
    MPTLIKE_FAULTS="prep_unit_delay_s=0.5"         mptlike-prep waits after each finished work unit,
                                                   so a test can kill it part-way (mptlike.data.units)
"""

from __future__ import annotations

import os
import signal as signal_module
from dataclasses import dataclass, fields

from mptlike.errors import MptlikeError

ENV = "MPTLIKE_FAULTS"


@dataclass(frozen=True)
class Faults:
    nan_at_step: int = 0
    checkpoint_delay_s: float = 0.0
    signal_at_step: int = -1  # -1: never
    signal: str = "TERM"
    signal_rank: int = 0
    prep_unit_delay_s: float = 0.0

    def poisons(self, position: int, global_batch_size: int) -> bool:
        """Whether the global batch at stream position `position` is the one `nan_at_step` names."""
        return self.nan_at_step > 0 and position == (self.nan_at_step - 1) * global_batch_size

    def maybe_signal(self, step: int, rank: int) -> None:
        """A real signal, delivered by the OS to this process, as step `signal_at_step` starts."""
        if step == self.signal_at_step and rank == self.signal_rank:
            os.kill(os.getpid(), getattr(signal_module, "SIG" + self.signal))


def active() -> Faults:
    """The faults `MPTLIKE_FAULTS` asks for (none when unset); read at each use, so tests may set it."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return Faults()
    types = {f.name: f.type for f in fields(Faults)}
    values = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in types:
            raise MptlikeError(f"{ENV}={text!r}: unknown fault {key!r}: use {', '.join(types)} (tests only)")
        cast = {"int": int, "float": float}.get(types[key], str)
        try:
            values[key] = cast(value.strip())
        except ValueError:
            raise MptlikeError(f"{ENV}={text!r}: {key} needs a number (tests only)") from None
    return Faults(**values)
