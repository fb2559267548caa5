"""`trainer.backend=composer`: the run mptlike.train.runner does, with composer.Trainer driving the loop.

Composer lives in its own environment (it needs torch 2.6-2.7), so nothing here imports it until a
run starts, and a missing Composer is one line saying how to install it. This module also finds
and reads Composer checkpoints with torch alone, which is what `mptlike-convert` uses.

Layout of run_dir/checkpoints/ for a Composer run (Composer's own names):
    ep0-ba100-rank0.pt     one file per checkpoint with the whole Trainer state (one process)
    ep0-ba100/             a sharded checkpoint (FSDP2, world > 1): torch.distributed.checkpoint
                           files `.metadata`, `__R_0.distcp`
    latest-rank0.pt        symlink to the newest complete checkpoint (Composer moves it only after
                           the save finished, so it never points at a half-written file)

Every checkpoint carries the model config as JSON in the state of the MptlikeRunInfo callback,
so its weights convert without the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mptlike.errors import MptlikeError, short_error
from mptlike.model import MPTConfig

if TYPE_CHECKING:
    from mptlike.train.plan import RunPlan
    from mptlike.train.runner import RunResult

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "run `make composer-env` and train with .venv-composer/bin/mptlike-train, or `pip install 'mptlike[composer]'` "
    "in an environment with torch >= 2.6, < 2.7.1"
)
CHECKPOINTS = "checkpoints"
LATEST = "latest-rank0.pt"
RUN_INFO = "MptlikeRunInfo"  # the callback whose state carries the model config (its class name)
RUN_INFO_CONFIG = "model_config_json"
RUN_INFO_VERSION = 1
MODEL_PREFIX = "model."  # ComposerMPT keeps MPTForCausalLM as `.model`
# Composer's default names: ep{epoch}-ba{batch}-rank0.pt (one file) or ep{epoch}-ba{batch}/ (sharded).
_FILE = re.compile(r"^ep\d+-ba(\d+)-rank0\.pt$")
_FOLDER = re.compile(r"^ep\d+-ba(\d+)$")
# Module wrappers that can leak into parameter names (activation checkpointing, torch.compile, FSDP1).
_WRAPPER_SEGMENTS = {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}


def require_composer() -> None:
    """Raise the one-line install hint when Composer cannot be imported here."""
    try:
        # A name from inside the package: a stray folder called `composer` on sys.path imports too.
        from composer import Trainer  # noqa: F401
    except Exception as exc:  # ImportError, or a Composer built for another torch failing on import
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MptlikeError(
            f"trainer.backend=composer needs MosaicML Composer, which cannot be imported here ({reason}): "
            f"{INSTALL_HINT}"
        ) from None


def check_composer_plan(plan: RunPlan) -> None:
    """What the Composer backend cannot do, refused before anything is prepared or written."""
    world, cfg = plan.world, plan.cfg
    if world.world_size > 1 and not world.external:
        raise MptlikeError(
            f"trainer.devices x trainer.num_nodes = {world.world_size} processes with trainer.backend=composer "
            f"need a launcher: run `torchrun --nproc_per_node={world.devices} -m mptlike.train ...` "
            f"(or `composer -n {world.devices} -m mptlike.train ...`)"
        )
    if plan.accelerator == "cpu" and plan.precision.name != "fp32":
        raise MptlikeError(
            f"trainer.precision={cfg.trainer.precision} with trainer.backend=composer on CPU: Composer trains on "
            "CPU in fp32 only; use trainer.precision=fp32 or a GPU"
        )
    if world.world_size > 1 and plan.accelerator == "cpu" and cfg.parallel.init == "sharded":
        raise MptlikeError(
            "parallel.init=sharded with trainer.backend=composer needs GPUs (Composer allocates meta parameters "
            "on CUDA): use parallel.init=rank0 or auto"
        )


# ---- finding checkpoints ------------------------------------------------------------------------


def checkpoint_folder(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_step(path: Path) -> int:
    """The optimizer step in a Composer checkpoint's name (ep0-ba120-rank0.pt, ep0-ba120/)."""
    match = _FILE.match(path.name) or _FOLDER.match(path.name)
    return int(match.group(1)) if match else 0


def _is_checkpoint(path: Path) -> bool:
    if path.is_file():
        return _FILE.match(path.name) is not None
    return path.is_dir() and _FOLDER.match(path.name) is not None and (path / ".metadata").is_file()


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint (file, or sharded folder) that Composer's `latest` link in `folder` names, or None."""
    link = folder / LATEST
    if link.is_symlink() or link.exists():
        target = link.resolve()
        return target if target.exists() else None
    # Composer replaces the link by deleting it first, so a crash in between leaves none: take the
    # newest complete checkpoint (a torch.save zip is readable only once written to the end; DCP
    # writes .metadata last).
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if _is_checkpoint(p) and (p.is_dir() or zipfile.is_zipfile(p))]
    return max(found, key=checkpoint_step) if found else None


def is_composer_checkpoint(path: Path) -> bool:
    """A Composer checkpoint file, a sharded one's folder, or a folder holding them (run_dir/checkpoints)."""
    if _is_checkpoint(path):
        return True
    return path.is_dir() and latest_checkpoint(path) is not None


def resolve_composer_checkpoint(path: Path) -> Path:
    """The checkpoint itself (file or sharded folder) for a path that may be a folder with a `latest` link."""
    if path.is_dir() and not (path / ".metadata").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise MptlikeError(f"{path} holds no Composer checkpoint: pass an ep0-baN-rank0.pt file or ep0-baN folder")
        return latest
    return path


def resolve_composer_resume(resume: str, run_dir: str | os.PathLike, *, overwrite: bool) -> Path | None:
    """The Composer checkpoint a run continues from (auto | never | PATH), or None; reads, never writes."""
    folder = checkpoint_folder(run_dir)
    has_any = folder.is_dir() and any(folder.iterdir())
    if resume == "never":
        if has_any and not overwrite:
            raise MptlikeError(
                f"resume=never but {folder} already holds checkpoints: use resume=auto to continue, another "
                f"run_dir, or checkpoint.overwrite=true to delete them"
            )
        return None
    if resume == "auto":
        latest = latest_checkpoint(folder) if folder.is_dir() else None
        if latest is None and has_any and any(p.name.startswith("step-") for p in folder.iterdir()):
            raise MptlikeError(
                f"{folder} holds checkpoints of the Lightning backend, which trainer.backend=composer cannot "
                f"continue: use another run_dir, or resume=never checkpoint.overwrite=true to start over"
            )
        return latest
    path = Path(resume)
    if not is_composer_checkpoint(path):
        raise MptlikeError(
            f"resume={resume} is not a Composer checkpoint: give a run_dir/checkpoints/ep0-baN-rank0.pt file "
            f"(or a sharded ep0-baN folder), auto or never"
        )
    return resolve_composer_checkpoint(path)


# ---- reading checkpoints without Composer -------------------------------------------------------


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def mptlike_state_dict(model_state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """MPTForCausalLM's state dict from a Composer checkpoint's `state['model']` (drops the `model.` prefix)."""
    out = {}
    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = _clean_name(key)
        out[name.removeprefix(MODEL_PREFIX)] = value
    return out


def _safe_globals() -> list[Any]:
    """The non-tensor types a Composer checkpoint pickles: timestamps, numpy RNG state, torch's version."""
    import codecs
    import datetime

    import numpy as np
    from torch.torch_version import TorchVersion

    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    dtypes = [type(np.dtype(name)) for name in ("uint8", "uint32", "int64", "float32", "float64", "bool")]
    return [datetime.timedelta, codecs.encode, np.dtype, np.ndarray, _reconstruct, TorchVersion, *dtypes]


def load_composer_file(path: Path) -> dict[str, Any]:
    """A monolithic Composer checkpoint, loaded on CPU without Composer and without running pickled code.

    `weights_only` loading admits tensors, containers and the few plain types listed above, so a
    file from elsewhere cannot execute anything while it is read.
    """
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and OS errors for a damaged or foreign file
        raise MptlikeError(
            f"{path} could not be read as a Composer checkpoint ({short_error(exc)}): pick another one"
        ) from None


def _config_from_json(text: Any) -> MPTConfig | None:
    return MPTConfig.from_dict(json.loads(text)) if isinstance(text, str) else None


def read_composer_checkpoint(path: str | os.PathLike) -> tuple[MPTConfig | None, dict[str, torch.Tensor]]:
    """(model config, MPTForCausalLM state dict) of a Composer checkpoint file or sharded folder.

    `path` may also be a folder with a `latest-rank0.pt` link (run_dir/checkpoints). The config is
    None only for checkpoints written without mptlike's MptlikeRunInfo callback.
    """
    path = resolve_composer_checkpoint(Path(path))
    if path.is_dir():
        return _read_sharded(path)
    checkpoint = load_composer_file(path)
    state = checkpoint.get("state", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise MptlikeError(f"{path} has no state['model']: it is not a Composer checkpoint")
    info = (state.get("callbacks") or {}).get(RUN_INFO)
    config = _config_from_json(info.get(RUN_INFO_CONFIG)) if isinstance(info, Mapping) else None
    return config, mptlike_state_dict(state["model"])


def _read_sharded(folder: Path) -> tuple[MPTConfig | None, dict[str, torch.Tensor]]:
    """Whole tensors from a sharded (torch.distributed.checkpoint) folder, read in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = "state.model." + MODEL_PREFIX
    config_key = f"state.callbacks.{RUN_INFO}.{RUN_INFO_CONFIG}"
    from mptlike.train.checkpoint import read_dcp_metadata

    metadata = read_dcp_metadata(folder)
    entries: dict[str, Any] = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not entries:
        raise MptlikeError(f"{folder} holds no tensors under {prefix}: it is not a Composer checkpoint of mptlike")
    if config_key in metadata.state_dict_metadata:
        entries[config_key] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group, assuming a single process" is the intent
            dcp.load(entries, storage_reader=dcp.FileSystemReader(str(folder)))
    except Exception as exc:  # CheckpointException wraps per-file read errors
        raise MptlikeError(
            f"{folder} could not be read ({short_error(exc)}): the shards are damaged, pick another step"
        ) from None
    config = _config_from_json(entries.pop(config_key, None))
    return config, {_clean_name(key[len(prefix):]): value for key, value in entries.items()}


# ---- the run ------------------------------------------------------------------------------------


def _launcher_env() -> None:
    # torchrun names the node GROUP_RANK; Composer reads NODE_RANK.
    if "RANK" in os.environ and "NODE_RANK" not in os.environ:
        os.environ["NODE_RANK"] = os.environ.get("GROUP_RANK", "0")


def _quiet_composer() -> None:
    # Composer logs its setup at INFO (seeds, run name, precision); our progress lines say what matters.
    logging.getLogger("composer").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*FSDP2 Config/APIs are experimental.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def run(plan: RunPlan) -> RunResult:
    """Train as `plan` says with composer.Trainer (what mptlike-train does for trainer.backend=composer)."""
    require_composer()
    from mptlike.integrations.composer import (
        build_composer_trainer,
        restore_checkpoint_rng,
        train_step_callback,
        trained_model,
    )
    from mptlike.train.runner import RunResult, ensure_data, write_config

    cfg = plan.cfg
    rank_zero = plan.world.rank == 0
    check_composer_plan(plan)
    _launcher_env()
    _quiet_composer()
    load_path = resolve_composer_resume(cfg.resume, plan.run_dir, overwrite=cfg.checkpoint.overwrite)
    plan.resume_from = load_path
    plan.start_step = checkpoint_step(load_path) if load_path is not None else 0
    ensure_data(plan)
    if rank_zero:
        folder = checkpoint_folder(plan.run_dir)
        if cfg.resume == "never" and cfg.checkpoint.overwrite and folder.exists():
            log.warning("checkpoint.overwrite=true: deleting %s", folder)
            shutil.rmtree(folder)
        write_config(plan)
    if plan.start_step >= cfg.trainer.max_steps:
        log.info("%s already reached trainer.max_steps=%d: nothing to train", load_path, cfg.trainer.max_steps)
        return RunResult(0, plan.start_step, 0.0, None, None, {}, None, None, rank_zero)

    trainer = build_composer_trainer(plan, load_path=load_path, resume_step=plan.start_step)
    if load_path is not None:
        log.info("resumed from %s at step %d", load_path, int(trainer.state.timestamp.batch))
    restore_checkpoint_rng(trainer)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    steps = train_step_callback(trainer)
    final_step = int(trainer.state.timestamp.batch)
    export_dir = sample = None
    if cfg.checkpoint.export_final or cfg.sample.max_new_tokens:
        from mptlike.train.export import export_and_sample

        export_dir, sample = export_and_sample(trained_model(trainer), plan)
    trainer.close()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    losses = [steps.losses[k] for k in sorted(steps.losses)]
    return RunResult(
        steps_run=final_step - plan.start_step,
        final_step=final_step,
        wall_seconds=wall,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        val=dict(steps.val),
        export_dir=export_dir,
        sample=sample,
        is_rank_zero=rank_zero,
    )
