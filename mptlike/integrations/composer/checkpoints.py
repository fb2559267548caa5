"""What the Composer backend refuses, and its checkpoints found and read with torch alone.

Nothing here imports Composer: `build_plan` calls these functions before any process starts, and
`mptlike-convert` reads Composer checkpoints in an environment without it.

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
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mptlike.errors import MptlikeError, short_error
from mptlike.model import MPTConfig
from mptlike.parallel import unwrapped_name
from mptlike.train.checkpoint import checkpoints_dir, read_dcp_entries, read_dcp_metadata

INSTALL_HINT = (
    "run `make composer-env` and train with .venv-composer/bin/mptlike-train, or `pip install 'mptlike[composer]'` "
    "in an environment with torch >= 2.6, < 2.7.1"
)
LATEST = "latest-rank0.pt"
RUN_INFO = "MptlikeRunInfo"  # the callback whose state carries the model config (its class name)
RUN_INFO_CONFIG = "model_config_json"
RUN_INFO_VERSION = 1
MODEL_PREFIX = "model."  # ComposerMPT keeps MPTForCausalLM as `.model`
# Composer's default names: ep{epoch}-ba{batch}-rank0.pt (one file) or ep{epoch}-ba{batch}/ (sharded).
_FILE = re.compile(r"^ep\d+-ba(\d+)-rank0\.pt$")
_FOLDER = re.compile(r"^ep\d+-ba(\d+)$")


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


# ---- finding checkpoints ------------------------------------------------------------------------


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
    folder = checkpoints_dir(run_dir)
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



def mptlike_state_dict(model_state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """MPTForCausalLM's state dict from a Composer checkpoint's `state['model']` (drops the `model.` prefix)."""
    out = {}
    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = unwrapped_name(key)
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
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # only for sharded checkpoints

    prefix = "state.model." + MODEL_PREFIX
    config_key = f"state.callbacks.{RUN_INFO}.{RUN_INFO_CONFIG}"
    metadata = read_dcp_metadata(folder)
    keys = [key for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)]
    if not keys:
        raise MptlikeError(f"{folder} holds no tensors under {prefix}: it is not a Composer checkpoint of mptlike")
    has_config = config_key in metadata.state_dict_metadata
    entries = read_dcp_entries(folder, keys + [config_key] * has_config, metadata)
    config = _config_from_json(entries.pop(config_key, None))
    return config, {unwrapped_name(key[len(prefix):]): value for key, value in entries.items()}
