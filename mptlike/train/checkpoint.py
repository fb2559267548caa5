"""Sharded training checkpoints: torch.distributed.checkpoint for tensors, a small json for the rest.

Layout of run_dir/checkpoints/step-0000100/:
    .metadata, __R_0.distcp    model and optimizer state, one file per saving rank (DCP). DCP
                               reshards on load, so a checkpoint saved by N ranks loads on M.
    train_state.json           world size and the components' states: progress (step, tokens),
                               data-loader position, guard (written by rank 0)
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
Tensor parallelism permutes Wqkv's rows in memory; checkpoints hold them, and their Adam moments, in
MPT's order (mptlike.parallel.tensor_parallel), so any mesh loads any checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mptlike import faults
from mptlike.errors import MptlikeError, short_error
from mptlike.files import atomic_write, replace_dir
from mptlike.parallel.tensor_parallel import (
    canonical_sharded_state,
    full_state_to_tp_order,
    sharded_state_from_canonical,
)
from mptlike.train.layout import CHECKPOINTS

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
ABANDONED = "abandoned"  # under checkpoints/: step folders newer than an older step a run resumed from
TRAIN_STATE = "train_state.json"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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


# Files up to this size are checksummed at save time and on every verification; larger ones (the
# tensor shards) are checked by size, which catches truncation and loss without reading gigabytes.
_HASHED_BYTES = 1 << 20


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inventory(folder: Path) -> dict[str, Any]:
    """What COMPLETE records of a finished checkpoint folder: every file's size, small files' sha256."""
    sizes, hashes = {}, {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE):
        name = path.relative_to(folder).as_posix()
        sizes[name] = path.stat().st_size
        if sizes[name] <= _HASHED_BYTES:
            hashes[name] = _sha256(path)
    return {"files": sizes, "sha256": hashes}


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be trusted, or None when every recorded file is intact.

    Cheap: sizes of all files and the sha256 of the small ones (metadata, train state, RNG) as
    COMPLETE recorded them at save time. Checkpoints written before COMPLETE held an inventory are
    checked for a readable train state only.
    """
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as exc:
        return f"its {COMPLETE} marker is unreadable ({short_error(exc)})"
    if not (path / ".metadata").is_file():
        return "its .metadata (the index of the tensor shards) is missing"
    for name, size in marker.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    for name, digest in marker.get("sha256", {}).items():
        if _sha256(path / name) != digest:
            return f"{name} does not match its checksum"
    try:
        read_train_state(path)
    except (OSError, ValueError, KeyError) as exc:
        return f"its {TRAIN_STATE} is unreadable ({short_error(exc)})"
    return None


def intact_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints that pass `checkpoint_problem`, oldest first; a
    damaged one is named in a warning."""
    intact = []
    for step, path in complete_checkpoints(run_dir, warn=True):
        problem = checkpoint_problem(path)
        if problem is None:
            intact.append((step, path))
        else:
            log.warning("skipping damaged checkpoint %s: %s", path, problem)
    return intact


def set_aside_newer(run_dir: str | os.PathLike, step: int) -> None:
    """Move step-N folders with N > `step` into checkpoints/abandoned/ (rank 0, when a run resumes
    from an older step): they belong to a trajectory this run leaves, and must be neither resumed
    (resume=auto takes the newest) nor counted by keep_last."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        match = _STEP_DIR.match(path.name.removesuffix(".tmp"))
        if match and int(match.group(1)) > step:
            aside = root / ABANDONED / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.parent.mkdir(exist_ok=True)
            os.replace(path, aside)
            log.warning("resuming at step %d: %s is newer and belongs to the run's abandoned path; moved to %s",
                        step, path, aside)


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    root = checkpoints_dir(run_dir)
    return root.is_dir() and any(root.iterdir())


def resolve_resume(resume: str, run_dir: str | os.PathLike, *, overwrite: bool) -> Path | None:
    """The checkpoint folder to start from, or None for a fresh start; reads, never writes."""
    if resume == "auto":
        # Newest first: a damaged newest checkpoint falls back to the one before it, with a warning.
        found = intact_checkpoints(run_dir)
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
        raise MptlikeError(
            f"resume={resume} does not exist: give a checkpoint folder (run_dir/checkpoints/step-N), auto or never"
        )
    if not is_complete(path):
        raise MptlikeError(
            f"resume={resume} is not a complete checkpoint (no {COMPLETE} or {TRAIN_STATE}): pick another step-N folder"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise MptlikeError(f"resume={resume} is damaged ({problem}): pick another step-N folder, or resume=auto")
    return path


def read_train_state(path: Path) -> dict[str, Any]:
    """train_state.json: {"world_size", then one entry per component: "progress", "loader", "guard"}.

    Checkpoints written before the components had their own entries kept their fields flat; they
    read as the current layout.
    """
    state = json.loads((path / TRAIN_STATE).read_text())
    if "progress" not in state:
        state["progress"] = {"step": state.pop("step"), "tokens_seen": state.pop("tokens_seen", 0)}
    if "guard" not in state:
        state["guard"] = {"events": state.pop("nonfinite_events", 0), "skip_positions": state.pop("skip_positions", [])}
    return state


def checkpoint_step(path: Path) -> int:
    """The number of optimizer steps a checkpoint folder holds."""
    return int(read_train_state(path)["progress"]["step"])


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


def _rank_failure(exc: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (whose text is a traceback)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return inner
    return exc


def _any_rank_failed(failed: bool) -> bool:
    if not _distributed():
        return failed
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@dataclass
class _Pending:
    """A checkpoint whose shards are written (or being written in the background), not yet COMPLETE."""

    step: int
    tmp: Path
    final: Path
    world_size: int
    future: Future | None = None
    error: BaseException | None = None


class Checkpointer:
    """This run's checkpoints: when to save, saving (in the background with async_save), the newest
    complete one, loading, and keeping the newest `keep_last`.

    A checkpoint holds the model and optimizer (DCP), each rank's RNG, and in train_state.json the
    `state_dict()` of every component handed to `save` (the loop's progress, the data loader, the
    guard), so a checkpoint is the union of the components' states.
    """

    def __init__(self, run_dir: str | os.PathLike, *, every_n_steps: int = 0, keep_last: int = 0,
                 async_save: bool = False, identity: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.identity = identity or {}  # what a resume must match (mptlike.train.plan.run_identity)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.last_saved_step = -1
        self.last_path: Path | None = None  # the checkpoint folder the last completed save wrote
        self._pending: _Pending | None = None
        self._async_group: Any = False  # False: synchronous saves; else the process group async saves use
        if async_save:
            # The background writer runs its own collectives (on CPU): a group of its own keeps them
            # from interleaving with training's on the default group.
            self._async_group = dist.new_group(backend="gloo") if _distributed() else None

    def due(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def newest(self, at_most: int | None = None) -> Path | None:
        """The newest intact checkpoint (of step `at_most` or earlier); damaged ones are skipped with a warning."""
        found = [(step, path) for step, path in intact_checkpoints(self.run_dir) if at_most is None or step <= at_most]
        return found[-1][1] if found else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             components: dict[str, Stateful]) -> None:
        """Collective: every rank calls it. Synchronous saves are COMPLETE when it returns."""
        self.wait()
        root = checkpoints_dir(self.run_dir)
        final = root / step_dir_name(step)
        tmp = root / (final.name + ".tmp")
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            self._make_room(root)
            tmp.mkdir(parents=True)
        _barrier()
        world = dist.get_world_size() if _distributed() else 1
        pending = _Pending(step, tmp, final, world)
        state = {"world_size": world, "identity": self.identity,
                 **{name: c.state_dict() for name, c in components.items()}}
        try:
            pending.future = self._write(tmp, model, optimizer, state)
        except BaseException as exc:  # DCP raises CheckpointException, a BaseException
            if not _disk_full(exc):
                raise
            pending.error = exc
        self._pending = pending
        self.last_saved_step = step
        if self._async_group is False:
            self.wait()

    def _write(self, tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               state: dict[str, Any]) -> Future | None:
        """This rank's shards and RNG, and (rank 0) the train state; the tensors in the background
        with async_save. The RNG and train state are this step's, so they are written right away."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # Wqkv (and its moments) in MPT's row order whatever the tensor-parallel layout: any mesh loads it.
        model_state, optim_state = canonical_sharded_state(model, *get_state_dict(model, optimizer))
        tensors = {"model": model_state, "optim": optim_state}
        future = None
        with _single_process_ok():
            if self._async_group is False:
                dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not _distributed())
            else:
                # Copies the tensors to CPU memory before returning, so training may change them at once.
                future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._async_group,
                                        no_dist=not _distributed())
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank-{_rank():05d}.pt")
        if _rank() == 0:
            atomic_write(tmp / TRAIN_STATE, json.dumps(state, indent=2) + "\n")
        return future

    def wait(self) -> Path | None:
        """Collective: finish the pending save (every rank's shards written, then COMPLETE, rename, prune).

        Raises MptlikeError on every rank when the disk filled up on any rank; the half-written
        .tmp folder is removed and the older checkpoints are left as they were.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        error = pending.error
        if pending.future is not None and error is None:
            try:
                pending.future.result()
            except BaseException as exc:
                if not _disk_full(exc):
                    raise
                error = exc
        # Every rank learns whether any rank ran out of space, so none waits forever at the barrier.
        if _any_rank_failed(error is not None):
            if _rank() == 0:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            _barrier()
            raise MptlikeError(
                f"disk full while writing checkpoint {pending.final}: free space on that disk (older step-N "
                f"folders there can go; keep the newest), then run again: resume=auto continues from the newest "
                f"checkpoint, which is intact"
            ) from None
        delay = faults.active().checkpoint_delay_s
        if delay > 0:
            time.sleep(delay)
        _barrier()
        if _rank() == 0:
            marker = {"step": pending.step, "world_size": pending.world_size,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **_inventory(pending.tmp)}
            atomic_write(pending.tmp / COMPLETE, json.dumps(marker) + "\n")
            # The final name exists already only when a run resumed from an older step reaches a step it saved before.
            replace_dir(pending.tmp, pending.final)
            self._prune()
        _barrier()
        log.info("step %d: checkpoint %s", pending.step, pending.final)
        self.last_path = pending.final
        return pending.final

    def _make_room(self, root: Path) -> None:
        """When the disk cannot hold another checkpoint as large as the newest, prune before writing
        (down to keep_last - 1, never below one intact checkpoint) instead of after."""
        intact = intact_checkpoints(self.run_dir)
        if self.keep_last <= 0 or len(intact) < 2 or len(intact) < self.keep_last:
            return
        newest = intact[-1][1]
        needed = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
        if shutil.disk_usage(root).free >= 1.1 * needed:
            return
        for _, path in intact[: len(intact) - max(1, self.keep_last - 1)]:
            log.warning("little disk space left (%.1f GB free, a checkpoint needs ~%.1f GB): deleting %s "
                        "before writing the next one", shutil.disk_usage(root).free / 1e9, needed / 1e9, path)
            shutil.rmtree(path, ignore_errors=True)

    def _prune(self) -> None:
        """Keep the newest keep_last intact checkpoints: a damaged one never counts, so the last
        intact checkpoint survives however many damaged ones follow it."""
        if self.keep_last <= 0:
            return
        kept = intact_checkpoints(self.run_dir)[-self.keep_last:]
        if not kept:
            return
        oldest_kept = kept[0][0]
        for step, path in complete_checkpoints(self.run_dir):
            # Older than every kept one, intact or damaged, goes; newer damaged folders stay for inspection.
            if step < oldest_kept:
                shutil.rmtree(path, ignore_errors=True)

    def remove_stale_tmp(self) -> None:
        """Delete .tmp folders left by a crash (rank 0, before training starts)."""
        root = checkpoints_dir(self.run_dir)
        if root.is_dir():
            for path in root.glob("step-*.tmp"):
                log.info("removing unfinished checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             components: dict[str, Stateful]) -> dict[str, Any]:
        """Collective: model (and optimizer) shards, RNG and the components' states saved at any world size.

        Returns the whole train state (step, world_size, every component's entry).
        """
        self.wait()
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            load_model_and_optimizer(path, model, optimizer)
        except (Exception, CheckpointException) as exc:  # a shape or key mismatch, a damaged shard
            raise MptlikeError(
                f"{path} does not load into this model and optimizer ({short_error(_rank_failure(exc))}): resume it "
                f"with the "
                f"model and optim.name it was written with, or start a new run_dir"
            ) from None
        state = read_train_state(path)
        for name, component in components.items():
            component.load_state_dict(state[name])
        self.last_saved_step = state["progress"]["step"]
        _load_rng(path, state["world_size"])
        return state


def load_model_and_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: the tensors of a checkpoint into a (possibly sharded) model and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    with _single_process_ok():
        if optimizer is None:
            model_state = get_model_state_dict(model)
            dcp.load({"model": model_state}, checkpoint_id=str(path), no_dist=not _distributed())
            set_model_state_dict(model, sharded_state_from_canonical(model, model_state)[0])
            return
        model_state, optim_state = get_state_dict(model, optimizer)
        # The checkpoint holds Wqkv in MPT's row order; a tensor-parallel model holds it permuted.
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(path), no_dist=not _distributed())
    model_state, optim_state = sharded_state_from_canonical(model, model_state, optim_state)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def _load_rng(path: Path, saved_world_size: int) -> None:
    rng_file = path / "rng" / f"rank-{_rank():05d}.pt"
    if not rng_file.is_file():
        log.warning("%s has no RNG state for rank %d (saved at world size %d); keeping the seeded RNG",
                    path, _rank(), saved_world_size)
        return
    try:
        _set_rng_state(torch.load(rng_file, weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, ValueError):
        # Checkpoints from before the pickle-free format: never unpickle, reseed instead.
        log.warning("%s is not in the weights-only RNG format; keeping the seeded RNG", rng_file)


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
    set_model_state_dict(model, full_state_to_tp_order(model, state), options=options)


def read_dcp_metadata(folder: Path):
    """The torch.distributed.checkpoint metadata of `folder`, or one clear error when it is damaged."""
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # pickle, EOF and OS errors for a damaged .metadata
        raise MptlikeError(
            f"{folder / '.metadata'} could not be read ({short_error(exc)}): pick another checkpoint"
        ) from None


def read_dcp_entries(folder: Path, keys: list[str], metadata=None) -> dict[str, Any]:
    """Whole values of `keys` from a torch.distributed.checkpoint folder, read in this one process.

    Tensors come back whole on CPU whatever sharding wrote them; other entries (bytes, strings) as
    saved. The one reader that `mptlike-convert` and the Composer checkpoint reader share.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = metadata if metadata is not None else read_dcp_metadata(folder)
    entries: dict[str, Any] = {}
    for key in keys:
        meta = metadata.state_dict_metadata[key]
        is_tensor = isinstance(meta, TensorStorageMetadata)
        entries[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype) if is_tensor else None
    try:
        with _single_process_ok():
            dcp.load(entries, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    except Exception as exc:  # CheckpointException wraps per-file read errors
        raise MptlikeError(
            f"{folder} could not be read ({short_error(exc)}): the shards are damaged, pick another step"
        ) from None
    return entries
