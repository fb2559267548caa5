"""Numerics guard: what a step with a NaN/inf loss or gradient norm does, and the record it leaves.

The check is free: the step already turns the (globally reduced) loss and the global gradient
norm into Python floats for logging, so every rank sees the same two numbers and takes the same
decision without another collective. It runs before the optimizer step, so the weights are
still finite whatever the policy:

- stop: raise `NonFiniteError` (the command line prints one line and exits 2) naming the step
  and the global sample indices of its batch; nothing is checkpointed.
- skip: drop the update (gradients zeroed, no optimizer step). The step still counts: the step
  number, the lr schedule (a function of the step) and the data position move on together.
- rollback: reload the newest complete checkpoint and pass over the offending global batch when
  the replay reaches it; the steps in between are trained again on the same data.

skip and rollback are allowed `guard.max_skips` times in a run (the count is checkpointed); the
next event stops. Every event is a warning line and a row of run_dir/guard_events.jsonl.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mptlike.errors import MptlikeError

POLICIES = ("stop", "skip", "rollback")
GUARD_EVENTS = "guard_events.jsonl"
SAMPLES_LOG = "samples.jsonl"
_SHOWN_IDS = 16  # sample indices spelled out in the one-line error; the events file has them all


class NonFiniteError(MptlikeError):
    """Training stopped on a NaN/inf loss or gradient norm."""


def check_guard_config(nonfinite: str, max_skips: int, inject_nan_at_step: int) -> None:
    if nonfinite not in POLICIES:
        raise MptlikeError(f"guard.nonfinite={nonfinite!r} is unknown: choose one of {', '.join(POLICIES)}")
    if max_skips < 0:
        raise MptlikeError(f"guard.max_skips={max_skips} is invalid: use a non-negative integer")
    if inject_nan_at_step < 0:
        raise MptlikeError(f"guard.inject_nan_at_step={inject_nan_at_step} is invalid: use 0 (off) or a step number")


def batch_sample_ids(position: int, global_batch_size: int, num_samples: int, seed: int) -> list[int]:
    """Dataset indices of the global batch that starts at stream position `position`."""
    from mptlike.data.sampler import global_sample_indices

    return global_sample_indices(position, global_batch_size, num_samples, seed).tolist()


def describe_ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:_SHOWN_IDS])
    more = f", ... ({len(ids)} in all, see {GUARD_EVENTS})" if len(ids) > _SHOWN_IDS else ""
    return f"[{shown}{more}]"


def stop_message(step: int, loss: float, grad_norm: float, ids: list[int], reason: str) -> str:
    return (
        f"step {step}: non-finite loss {loss} or gradient norm {grad_norm} on the global batch of samples "
        f"{describe_ids(ids)}; {reason}; stopped before the optimizer step (the last checkpoint and the "
        f"weights are finite): lower optim.lr, raise optim.warmup_steps, inspect those samples, or set "
        f"guard.nonfinite=skip|rollback"
    )


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line per record, flushed and fsynced, so a killed job keeps every completed row."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows up to `last_step` (the resumed step); a torn last line from a kill is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
