"""NonFiniteGuard: what a step with a NaN/inf loss or gradient norm does, and the record it leaves.

The check is free: the step already turns the (globally reduced) loss and the global gradient
norm into Python floats for logging, so every rank sees the same two numbers and takes the same
decision without another collective. It runs before the optimizer step, so the weights are
still finite whatever the policy (`guard.nonfinite`):

- stop: raise `NonFiniteError` (the command line prints one line and exits 2) naming the step
  and the global sample indices of its batch.
- skip: drop the update (no optimizer step). The step still counts: the step number, the lr
  schedule (a function of the step) and the data position move on together.
- rollback: reload the newest complete checkpoint and pass over the offending global batch when
  the replay reaches it; the steps in between are trained again on the same data.

skip and rollback are allowed `guard.max_skips` times in a run (the count is checkpointed with
the positions to pass over); the next event stops. Every event is a warning line and a row of
run_dir/guard_events.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

from mptlike.errors import MptlikeError
from mptlike.files import atomic_write
from mptlike.train.layout import GUARD_EVENTS

log = logging.getLogger(__name__)

_SHOWN_IDS = 16  # sample indices spelled out in the one-line error; the events file has them all


class NonFiniteError(MptlikeError):
    """Training stopped on a NaN/inf loss or gradient norm."""


class Action(str, Enum):
    STEP = "step"
    SKIP = "skip"
    ROLLBACK = "rollback"


def batch_sample_ids(position: int, global_batch_size: int, num_samples: int, seed: int) -> list[int]:
    """Dataset indices of the global batch that starts at stream position `position`."""
    from mptlike.data.sampler import global_sample_indices

    return global_sample_indices(position, global_batch_size, num_samples, seed).tolist()


def describe_ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:_SHOWN_IDS])
    more = f", ... ({len(ids)} in all, see {GUARD_EVENTS})" if len(ids) > _SHOWN_IDS else ""
    return f"[{shown}{more}]"


def stop_message(step: int, loss: float, grad_norm: float, ids: list[int], reason: str,
                 policies: str = "skip|rollback") -> str:
    return (
        f"step {step}: non-finite loss {loss} or gradient norm {grad_norm} on the global batch of samples "
        f"{describe_ids(ids)}; {reason}; stopped before the optimizer step (the last checkpoint and the "
        f"weights are finite): lower optim.lr, raise optim.warmup_steps, inspect those samples, or set "
        f"guard.nonfinite={policies}"
    )


class NonFiniteGuard:
    """Decides stop | skip | rollback for a non-finite step; its state travels in every checkpoint."""

    def __init__(self, policy: str, max_skips: int, run_dir: Path | None, *,
                 policies: tuple[str, ...] = ("stop", "skip", "rollback")) -> None:
        self.policy = str(policy)
        # The policies the backend offers; a stop names the others as the way out.
        self.other_policies = "|".join(p for p in policies if p != "stop")
        self.max_skips = max_skips
        self.events_file = run_dir / GUARD_EVENTS if run_dir is not None else None  # None: not rank 0
        self.events = 0  # skip/rollback events so far
        self.skip_positions: set[int] = set()  # stream positions of global batches a rollback passes over

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events, "skip_positions": sorted(self.skip_positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = int(state.get("events", 0))
        self.skip_positions = {int(p) for p in state.get("skip_positions", [])}

    def check(self, *, step: int, loss: float, grad_norm: float, position: int,
              ids_of: Callable[[int], list[int]]) -> Action:
        """The action for optimizer step `step` (1-based); raises NonFiniteError for stop.

        `ids_of(position)` gives the batch's sample ids; it runs only for a non-finite step.
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return Action.STEP
        ids = ids_of(position)
        policy = self.policy
        if policy != "stop" and self.events >= self.max_skips:
            reason = f"guard.max_skips={self.max_skips} events already handled by guard.nonfinite={policy}"
            policy = "stop"
        else:
            reason = "guard.nonfinite=stop"
        if self.events_file is not None:
            append_jsonl(self.events_file, {"step": step, "loss": repr(loss), "grad_norm": repr(grad_norm),
                                            "action": policy, "stream_position": position, "samples": ids})
        if policy == "stop":
            raise NonFiniteError(stop_message(step, loss, grad_norm, ids, reason, self.other_policies))
        self.events += 1
        if policy == "rollback":
            self.skip_positions.add(position)
        log.warning("step %d: non-finite loss %s or gradient norm %s on samples %s: %s (event %d of at most %d)",
                    step, loss, grad_norm, describe_ids(ids),
                    "update skipped" if policy == "skip" else "rolling back to the last checkpoint",
                    self.events, self.max_skips)
        return Action(policy)

    def no_checkpoint_to_roll_back_to(self, step: int, ids: list[int]) -> NonFiniteError:
        reason = "guard.nonfinite=rollback found no complete checkpoint to roll back to"
        return NonFiniteError(stop_message(step, float("nan"), float("nan"), ids, reason))


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
    atomic_write(path, "".join(line + "\n" for line in kept))
