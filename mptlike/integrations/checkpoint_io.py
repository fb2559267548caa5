"""Load a model from wherever training or the Hub left it, and write output folders atomically.

A CHECKPOINT argument may be:
- a `save_pretrained` folder (config.json with model_type "mptlike" + model.safetensors), such as
  a training run's `final/`;
- a training run folder: its `final/` when present, else its newest complete checkpoint;
- a sharded checkpoint `run_dir/checkpoints/step-XXXXXXX/` (torch.distributed.checkpoint): the
  model tensors are gathered into whole tensors in this one process, no process group needed, and
  the model config comes from the run's `config.yaml`;
- a Hugging Face MPT folder (model_type "mpt", either layout), converted on the fly;
- a checkpoint of a `trainer=composer` run: `run_dir/checkpoints/ep0-baN-rank0.pt`, a sharded
  `ep0-baN/` folder, or the run folder (its `latest-rank0.pt`), read without Composer installed.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mptlike.data.remote import is_remote, run_view
from mptlike.errors import MptlikeError, short_error
from mptlike.integrations import hf, hf_io
from mptlike.integrations.composer.checkpoints import (
    is_composer_checkpoint,
    latest_checkpoint,
    read_composer_checkpoint,
    resolve_composer_checkpoint,
)
from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.model.mpt import CONFIG_NAME, MODEL_TYPE, WEIGHTS_NAME
from mptlike.parallel import unwrapped_name
from mptlike.train.layout import CHECKPOINTS, CONFIG, FINAL

log = logging.getLogger(__name__)

DCP_METADATA = ".metadata"
PRETRAINED, SHARDED, HUGGING_FACE, COMPOSER = "pretrained", "sharded", "hf", "composer"
_ANCHOR = "transformer.wte.weight"
_NOT_A_CHECKPOINT = (
    "pass a save_pretrained folder (config.json + model.safetensors), a training run folder "
    "(with final/ or checkpoints/), a checkpoints/step-N folder, or a Hugging Face MPT folder"
)


@dataclass
class TokenizerSource:
    """Where the tokenizer of a checkpoint lives: a `load_tokenizer` spec and the files to ship with exports."""

    spec: str
    data_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    eos_id: int | None = None

    def load(self):
        from mptlike.data.tokenizer import load_tokenizer

        return load_tokenizer(self.spec, self.data_dir)


@dataclass
class Checkpoint:
    model: MPTForCausalLM  # on CPU, in the stored dtype, in eval mode
    path: Path  # the folder the weights were read from
    kind: str  # PRETRAINED, SHARDED or HUGGING_FACE
    run_dir: Path | None = None
    tokenizer: TokenizerSource | None = None

    @property
    def config(self) -> MPTConfig:
        return self.model.config


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The model (and what is known about its run and tokenizer) behind a CHECKPOINT argument."""
    folder = resolve_checkpoint(Path(path))
    run_dir = _run_dir_of(folder)
    config_file = folder / CONFIG_NAME
    if is_composer_checkpoint(folder):
        model, kind = _read_composer(folder, run_dir), COMPOSER
    elif config_file.is_file():
        values = hf_io.read_json(config_file, "")
        if values.get("model_type") == MODEL_TYPE:
            model, kind = _read_pretrained(folder), PRETRAINED
        elif values.get("model_type") == hf.MODEL_TYPE:
            model, kind = _read_hf(folder), HUGGING_FACE
        else:
            raise MptlikeError(
                f"{config_file} has model_type={values.get('model_type')!r}, neither 'mptlike' nor 'mpt': "
                + _NOT_A_CHECKPOINT
            )
    else:
        model, kind = _read_sharded(folder, run_dir), SHARDED
    model.eval()
    log.info("loaded %s checkpoint %s", kind, folder)
    return Checkpoint(model=model, path=folder, kind=kind, run_dir=run_dir, tokenizer=find_tokenizer(folder, run_dir))


def resolve_checkpoint(path: Path) -> Path:
    """The folder that holds the weights a CHECKPOINT argument refers to."""
    if not path.exists():
        raise MptlikeError(f"checkpoint {path} does not exist: {_NOT_A_CHECKPOINT}")
    if is_composer_checkpoint(path):
        return resolve_composer_checkpoint(path)
    if path.is_file():
        if path.name not in (CONFIG_NAME, WEIGHTS_NAME, DCP_METADATA):
            raise MptlikeError(f"checkpoint {path} is a file: {_NOT_A_CHECKPOINT}")
        path = path.parent
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / DCP_METADATA).is_file():
        _check_complete(path)
        return path
    if (path / FINAL / CONFIG_NAME).is_file():
        return path / FINAL
    run_dir = path if (path / CHECKPOINTS).is_dir() else path.parent if path.name == CHECKPOINTS else None
    if run_dir is not None:
        from mptlike.train.checkpoint import complete_checkpoints

        found = complete_checkpoints(run_dir)
        composer_latest = latest_checkpoint(run_dir / CHECKPOINTS)
        if not found and composer_latest is not None:
            return composer_latest
        if not found:
            raise MptlikeError(
                f"{run_dir / CHECKPOINTS} holds no complete checkpoint: train longer or pick a folder"
            )
        return found[-1][1]
    raise MptlikeError(f"{path} holds no checkpoint: {_NOT_A_CHECKPOINT}")


def _check_complete(folder: Path) -> None:
    from mptlike.train.checkpoint import COMPLETE, is_complete

    unfinished = folder.name.endswith(".tmp") or (
        folder.parent.name == CHECKPOINTS and not is_complete(folder)
    )
    if unfinished:
        raise MptlikeError(
            f"{folder} is an unfinished checkpoint (no {COMPLETE} marker; the save was interrupted): pick another step"
        )


def _run_dir_of(folder: Path) -> Path | None:
    """The training run a checkpoint folder belongs to (run_dir/final or run_dir/checkpoints/step-N)."""
    if folder.parent.name == CHECKPOINTS:
        candidate = folder.parent.parent
    elif folder.name == FINAL:
        candidate = folder.parent
    else:
        return None
    return candidate if (candidate / CONFIG).is_file() else None


# ---- the three formats ------------------------------------------------------------------------


def _read_pretrained(folder: Path) -> MPTForCausalLM:
    from safetensors import SafetensorError

    try:
        return MPTForCausalLM.from_pretrained(folder)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise MptlikeError(
            f"{folder / WEIGHTS_NAME} could not be read ({short_error(exc)}): the file is damaged, re-export it"
        ) from None


def _read_hf(folder: Path) -> MPTForCausalLM:
    info = hf.config_from_hf(hf_io.read_hf_config(folder), str(folder / hf_io.CONFIG_NAME))
    state = hf.state_dict_from_hf(hf_io.read_hf_weights(folder), info, str(folder))
    return model_from_state(info.config, state)


def _read_sharded(folder: Path, run_dir: Path | None) -> MPTForCausalLM:
    config = _sharded_config(folder, run_dir)
    return model_from_state(config, read_dcp_model_state(folder, config))


def _read_composer(path: Path, run_dir: Path | None) -> MPTForCausalLM:
    config, state = read_composer_checkpoint(path)
    if config is None:  # saved without mptlike's MptlikeRunInfo callback: the run's config.yaml names the model
        config = _sharded_config(path, run_dir)
    hf.check_state_dict(state, config, str(path))
    return model_from_state(config, state)


def model_from_state(config: MPTConfig, state: dict[str, torch.Tensor]) -> MPTForCausalLM:
    """Our model holding exactly these tensors (no copies, no init); the state must be checked already."""
    with torch.device("meta"):
        model = MPTForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _sharded_config(folder: Path, run_dir: Path | None) -> MPTConfig:
    if run_dir is None:
        raise MptlikeError(
            f"{folder} is a sharded checkpoint outside a training run, so its model config is unknown: pass "
            f"the step folder inside run_dir/{CHECKPOINTS}/ (the run's {CONFIG} names the model)"
        )
    values = read_run_config(run_dir)
    model = values.get("model") if values else None
    if not isinstance(model, dict):
        raise MptlikeError(f"{run_dir / CONFIG} has no model section: it is not an mptlike run config")
    known = {f.name for f in fields(MPTConfig)}
    try:
        return MPTConfig.from_dict({k: v for k, v in model.items() if k in known})
    except MptlikeError as exc:
        raise MptlikeError(f"{run_dir / CONFIG}: {exc}") from None


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved training config saved as run_dir/config.yaml, or None when there is none."""
    path = run_dir / CONFIG
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.load(path)
    except Exception as exc:  # yaml and OmegaConf raise many unrelated types for a malformed file
        raise MptlikeError(f"{path} is not valid YAML ({short_error(exc)}): restore it from the run") from None
    try:
        values = OmegaConf.to_container(conf, resolve=True)
    except Exception:  # an interpolation that only resolves inside the trainer
        values = OmegaConf.to_container(conf, resolve=False)
    return values if isinstance(values, dict) else None



def read_dcp_model_state(folder: Path, config: MPTConfig) -> dict[str, torch.Tensor]:
    """Whole model tensors from a torch.distributed.checkpoint folder, read in this single process.

    The checkpoint may hold more than the model (optimizer state, under other prefixes); the model's
    prefix is the one under which every parameter of `config` is found, and only those are read.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from mptlike.train.checkpoint import read_dcp_entries, read_dcp_metadata

    metadata = read_dcp_metadata(folder)
    tensors = {
        unwrapped_name(key): (key, meta)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    expected = hf.expected_shapes(config)
    prefixes = sorted({name[: -len(_ANCHOR)] for name in tensors if name.endswith(_ANCHOR)}, key=len)
    chosen = next((p for p in prefixes if all(p + name in tensors for name in expected)), None)
    if chosen is None:
        best = prefixes[0] if prefixes else ""
        missing = [name for name in expected if best + name not in tensors]
        raise MptlikeError(
            f"{folder} does not hold this model's weights ({len(missing)} of {len(expected)} tensors missing, e.g. "
            f"{missing[0]}): the run's {CONFIG} and the checkpoint disagree"
        )
    wrong = [n for n, shape in expected.items() if tuple(tensors[chosen + n][1].size) != tuple(shape)]
    if wrong:
        got = tuple(tensors[chosen + wrong[0]][1].size)
        raise MptlikeError(
            f"{folder} stores {wrong[0]} as {got} but the run's {CONFIG} implies {tuple(expected[wrong[0]])}: "
            "the checkpoint and config disagree"
        )
    buffers = read_dcp_entries(folder, [tensors[chosen + name][0] for name in expected], metadata)
    return {name: buffers[tensors[chosen + name][0]] for name in expected}


# ---- tokenizer --------------------------------------------------------------------------------


def find_tokenizer(folder: Path, run_dir: Path | None) -> TokenizerSource | None:
    """The tokenizer a checkpoint was trained with, when its folder or its run's data manifest says."""
    files = hf_io.tokenizer_files_in(folder)
    if files:
        return TokenizerSource(spec=str(folder), files=files)
    if run_dir is None:
        return None
    data_dir = _run_data_dir(run_dir)
    if data_dir is None:
        return None
    from mptlike.data.manifest import Manifest

    try:
        manifest = Manifest.load(data_dir)
    except MptlikeError as exc:
        log.warning("the run's data folder gives no tokenizer: %s", exc)
        return None
    return TokenizerSource(
        spec=manifest.tokenizer, data_dir=data_dir, files=hf_io.tokenizer_files_in(data_dir), eos_id=manifest.eos_id
    )


def load_checkpoint_tokenizer(
    ckpt: Checkpoint,
    override: TokenizerSource | None = None,
    *,
    name: str | os.PathLike | None = None,
    option: str = "--tokenizer ",
    data_option: str = "--tokenizer-data ",
):
    """The tokenizer to run `ckpt` with: `override`, else the one its folder or run names.

    Refuses, naming `option` (how the caller's user passes a tokenizer), a checkpoint whose tokenizer
    is unknown and a tokenizer with more ids than the model's embedding has rows.
    """
    source = override or ckpt.tokenizer
    if source is None:
        raise MptlikeError(
            f"no tokenizer is known for {name or ckpt.path} (no tokenizer.json in it and no run data manifest): "
            f"pass {option}bytes, {option}PATH/tokenizer.json, or {option}bpe:N {data_option}DATA_DIR"
        )
    tokenizer = source.load()
    vocab_size = ckpt.config.vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise MptlikeError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only vocab_size={vocab_size}: pass the "
            f"tokenizer the model was trained with ({option.strip(' =')})"
        )
    return tokenizer


def _run_data_dir(run_dir: Path) -> Path | None:
    values = read_run_config(run_dir) or {}
    data = values.get("data") if isinstance(values.get("data"), dict) else {}
    raw = data.get("path")
    if raw is None:
        vocab = data.get("vocab_size")
        if not isinstance(vocab, int):
            return None
        from mptlike.data.prep import default_corpus_dir

        raw = str(default_corpus_dir(vocab))
    if is_remote(raw):  # s3://...: the local copy of its manifest and tokenizer (mptlike.data.remote)
        return run_view(str(raw), data)
    path = Path(str(raw)).expanduser()
    # A relative data.path was relative to where training ran, typically two levels above run_dir.
    candidates = [path] if path.is_absolute() else [path, run_dir.parent.parent / path, run_dir.parent / path]
    return next((c for c in candidates if (c / "manifest.json").is_file()), None)


# ---- writing ----------------------------------------------------------------------------------


@contextmanager
def staged_output(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """A fresh folder next to `out` that becomes `out` only when the block finishes without error.

    An existing non-empty `out` is refused unless `force`; it is then replaced only after the new
    folder is complete, so a failure at any point leaves `out` as it was and no staging folder behind.
    """
    out = Path(out).absolute()
    if out.exists():
        if not out.is_dir():
            raise MptlikeError(f"{out} exists and is not a folder: choose another output path")
        if any(out.iterdir()) and not force:
            raise MptlikeError(
                f"{out} already exists and is not empty: choose a new folder or pass --force to replace it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                # safetensors and mkstemp create owner-only files; an export is meant to be shared.
                path.chmod(0o644)
        if out.exists():
            old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

