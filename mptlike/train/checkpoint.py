"""Sharded training checkpoints: torch.distributed.checkpoint for tensors, a small json for the rest.

Layout of run_dir/checkpoints/step-0000100/:
    .metadata, __R_0.distcp    model and optimizer state, one file per saving rank (DCP). DCP
                               reshards on load, so a checkpoint saved by N ranks loads on M.
    train_state.json           step, data-loader position, world size (written by rank 0)
    rng/rank-0000R.pt          each rank's RNG states (tensors, lists and ints: loads with weights_only=True)
    COMPLETE                   written last, by rank 0, after every rank finished

With checkpoint.async_save the tensors are copied to CPU memory and written by a background
thread while training goes on; the COMPLETE marker is written only once every rank's write has
finished (before the next checkpoint, a rollback, or the end of training).
Everything is first written to step-0000100.tmp; the folder is renamed only once COMPLETE is in
it, so a folder with the final name is always whole and a crash leaves only a .tmp behind. A full
disk removes the .tmp and raises one MptlikeError on every rank; older checkpoints are untouched.
`get_state_dict`/`set_state_dict` give FSDP2-sharded and plain single-process models the same
parameter names (wrappers such as activation checkpointing are stripped), so both share one path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mptlike.errors import MptlikeError, short_error

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TRAIN_STATE = "train_state.json"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs; the lr schedule is a function of `step`."""

    step: int
    loader: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    tokens_seen: int = 0
    nonfinite_events: int = 0  # guard events (skip/rollback) so far: guard.max_skips counts all of them
    skip_positions: list[int] = field(default_factory=list)  # stream positions of batches rollback passes over


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / TRAIN_STATE).is_file()


def complete_checkpoints(run_dir: str | os.PathLike, *, warn: bool = False) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in run_dir, oldest first."""
    root = checkpoints_dir(run_dir)
    found = []
    if not root.is_dir():
        return found
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        if is_complete(path):
            found.append((int(match.group(1)), path))
        elif warn:
            log.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE)
    return sorted(found)


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    root = checkpoints_dir(run_dir)
    return root.is_dir() and any(root.iterdir())


def resolve_resume(resume: str, run_dir: str | os.PathLike, *, overwrite: bool) -> Path | None:
    """The checkpoint folder to start from, or None for a fresh start; reads, never writes."""
    if resume == "auto":
        found = complete_checkpoints(run_dir, warn=True)
        return found[-1][1] if found else None
    if resume == "never":
        if has_checkpoints(run_dir) and not overwrite:
            raise MptlikeError(
                f"resume=never but {checkpoints_dir(run_dir)} already holds checkpoints: use resume=auto to "
                f"continue, another run_dir, or checkpoint.overwrite=true to delete them"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise MptlikeError(f"resume={resume} does not exist: give a checkpoint folder (run_dir/checkpoints/step-N), auto or never")
    if not is_complete(path):
        raise MptlikeError(
            f"resume={resume} is not a complete checkpoint (no {COMPLETE} or {TRAIN_STATE}): pick another step-N folder"
        )
    return path


def read_train_state(path: Path) -> TrainState:
    values = json.loads((path / TRAIN_STATE).read_text())
    return TrainState(**values)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok():
    # DCP warns on every single-process save/load; one process is a supported, intended case here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    # Only tensors, lists, ints and floats, so that loading needs no pickle (weights_only=True).
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _disk_full(exc: BaseException | None, depth: int = 0) -> bool:
    """Whether ENOSPC is somewhere in an exception, its causes, or DCP's per-rank failures."""
    if exc is None or depth > 8:
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    nested = list(getattr(exc, "failures", {}).values()) if isinstance(getattr(exc, "failures", None), dict) else []
    nested += [exc.__cause__, exc.__context__]
    for inner in nested:
        if isinstance(inner, tuple) and inner:
            inner = inner[0]  # DCP keeps each rank's failure as (exception, traceback summary)
        if isinstance(inner, BaseException) and _disk_full(inner, depth + 1):
            return True
    return False


def _any_rank_failed(failed: bool) -> bool:
    if not _distributed():
        return failed
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _write_shards(
    tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, *, async_group: Any = False
) -> Future | None:
    """Write this rank's shards, RNG state and (rank 0) the train state; the tensors in the
    background when `async_group` is not False (a process group with a CPU backend, or None for the
    default group). The RNG and train state are this step's, so they are written right away."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "optim": optim_state}
    future = None
    with _single_process_ok():
        if async_group is False:
            dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not _distributed())
        else:
            # Copies the tensors to CPU memory before returning, so training may change them at once.
            future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=async_group,
                                    no_dist=not _distributed())
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank-{_rank():05d}.pt")
    if _rank() == 0:
        _atomic_write_text(tmp / TRAIN_STATE, json.dumps(asdict(state), indent=2) + "\n")
    return future


@dataclass
class PendingCheckpoint:
    """A checkpoint whose shards may still be being written; `finish_checkpoint` completes it."""

    run_dir: Path
    tmp: Path
    final: Path
    state: TrainState
    keep_last: int
    test_delay_s: float
    future: Future | None = None
    error: BaseException | None = None


def start_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    *,
    keep_last: int = 0,
    test_delay_s: float = 0.0,
    async_group: Any = False,
) -> PendingCheckpoint:
    """Collective: every rank calls it. Writes (or, with async_group, starts writing) the shards."""
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(state.step)
    tmp = root / (final.name + ".tmp")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    pending = PendingCheckpoint(Path(run_dir), tmp, final, state, keep_last, test_delay_s)
    try:
        pending.future = _write_shards(tmp, model, optimizer, state, async_group=async_group)
    except BaseException as exc:  # DCP raises CheckpointException, a BaseException
        if not _disk_full(exc):
            raise
        pending.error = exc
    return pending


def finish_checkpoint(pending: PendingCheckpoint) -> Path:
    """Collective: wait for every rank's shards, then write COMPLETE and rename; returns the folder.

    Raises MptlikeError on every rank when the disk filled up on any rank; the half-written .tmp
    folder is removed and the older checkpoints are left as they were.
    """
    rank = _rank()
    error = pending.error
    if pending.future is not None and error is None:
        try:
            pending.future.result()
        except BaseException as exc:
            if not _disk_full(exc):
                raise
            error = exc
    tmp, final = pending.tmp, pending.final
    # Every rank learns whether any rank ran out of space, so none waits forever at the barrier.
    if _any_rank_failed(error is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise MptlikeError(
            f"disk full while writing checkpoint {final}: free space or lower checkpoint.keep_last "
            f"(the previous checkpoints are intact; resume=auto continues from the newest)"
        ) from None
    if pending.test_delay_s > 0:
        time.sleep(pending.test_delay_s)
    _barrier()
    if rank == 0:
        state = pending.state
        marker = {"step": state.step, "world_size": state.world_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _atomic_write_text(tmp / COMPLETE, json.dumps(marker) + "\n")
        if final.exists():
            # Only when a run resumed from an older step reaches a step it had saved before.
            stale = final.with_name(final.name + ".old")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        _prune(pending.run_dir, pending.keep_last)
    _barrier()
    return final


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    *,
    keep_last: int = 0,
    test_delay_s: float = 0.0,
) -> Path:
    """Collective: every rank calls it. Returns the final folder (see finish_checkpoint for errors)."""
    return finish_checkpoint(start_checkpoint(run_dir, model, optimizer, state, keep_last=keep_last,
                                              test_delay_s=test_delay_s))


def _prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_tmp(run_dir: str | os.PathLike) -> None:
    """Delete .tmp folders left by a crash (rank 0, before training starts)."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for path in root.glob("step-*.tmp"):
            log.info("removing unfinished checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainState:
    """Collective: load model (and optimizer) shards, RNG and train state saved at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_state = get_model_state_dict(model)
        with _single_process_ok():
            dcp.load({"model": model_state}, checkpoint_id=str(path), no_dist=not _distributed())
        set_model_state_dict(model, model_state)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        with _single_process_ok():
            dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(path), no_dist=not _distributed())
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    state = read_train_state(path)
    rng_file = path / "rng" / f"rank-{_rank():05d}.pt"
    if rng_file.is_file():
        try:
            _set_rng_state(torch.load(rng_file, weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, ValueError):
            # Checkpoints from before the pickle-free format: never unpickle, reseed instead.
            log.warning("%s is not in the weights-only RNG format; keeping the seeded RNG", rng_file)
    else:
        log.warning("%s has no RNG state for rank %d (saved at world size %d); keeping the seeded RNG",
                    path, _rank(), state.world_size)
    return state


def load_pretrained_weights(model: nn.Module, folder: Path) -> None:
    """Collective: copy a save_pretrained folder's weights into a (possibly sharded) model.

    Only rank 0 reads the file; the tensors are broadcast and each rank keeps its shards, so the
    full model is in one process's CPU memory once, not once per rank.
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from mptlike.model.mpt import WEIGHTS_NAME

    multi = _distributed() and dist.get_world_size() > 1
    state = load_file(str(folder / WEIGHTS_NAME)) if _rank() == 0 or not multi else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=multi)
    set_model_state_dict(model, state, options=options)


def read_dcp_metadata(folder: Path):
    """The torch.distributed.checkpoint metadata of `folder`, or one clear error when it is damaged."""
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # pickle, EOF and OS errors for a damaged .metadata
        raise MptlikeError(
            f"{folder / '.metadata'} could not be read ({short_error(exc)}): pick another checkpoint"
        ) from None
