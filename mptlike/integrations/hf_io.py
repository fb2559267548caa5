"""Hugging Face checkpoint folders on disk: config.json, weights in any of the four published layouts.

Read: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
`pytorch_model.bin`, or `pytorch_model-0000N-of-0000M.bin` with `pytorch_model.bin.index.json`.
Pickled `.bin` files are only ever opened with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers, so a checkpoint cannot run code on load.
Write: config.json, safetensors (sharded past a size limit) and the tokenizer files.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from mptlike.errors import MptlikeError, short_error

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS_NAME, BIN_INDEX, BIN_NAME)  # in order of preference
TOKENIZER_JSON = "tokenizer.json"
# What transformers' AutoTokenizer and our load_tokenizer read next to a tokenizer.json.
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MptlikeError(f"{path} is missing: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MptlikeError(f"{path} is not valid JSON ({exc}): re-download or re-export it") from None
    if not isinstance(values, dict):
        raise MptlikeError(f"{path} is not a JSON object: re-download or re-export it")
    return values


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a Hugging Face MPT folder; anything but model_type "mpt" is refused."""
    if not folder.is_dir():
        raise MptlikeError(f"{folder} is not a folder: pass the folder holding config.json and the weights")
    values = read_json(folder / CONFIG_NAME, "a Hugging Face checkpoint folder needs config.json next to its weights")
    model_type = values.get("model_type")
    if model_type == "mptlike":
        raise MptlikeError(
            f"{folder / CONFIG_NAME} is already in mptlike's format: use the folder directly (no from-hf needed)"
        )
    if model_type != "mpt":
        raise MptlikeError(
            f"{folder / CONFIG_NAME} has model_type={model_type!r}, not 'mpt': only MPT checkpoints can be converted"
        )
    return values


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint folder, on CPU, in the stored dtype."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            return _read_sharded(path)
        return _read_file(path)
    raise MptlikeError(
        f"{folder} holds no weights: expected one of {', '.join(WEIGHT_FILES)} (with its shards)"
    )


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    index = read_json(index_path, "the shard index is missing")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MptlikeError(f"{index_path} has no weight_map: re-download or re-export the checkpoint")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values()), key=str):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise MptlikeError(f"{index_path} names shard {shard!r}, which is not a file next to the index")
        path = index_path.parent / shard
        if not path.is_file():
            raise MptlikeError(
                f"shard {shard} named in {index_path} is missing: download every shard the index lists"
            )
        for name, tensor in _read_file(path).items():
            if name in state:
                raise MptlikeError(f"tensor {name} appears in two shards of {index_path}: the shards are inconsistent")
            state[name] = tensor
    absent = [name for name in weight_map if name not in state]
    if absent:
        raise MptlikeError(
            f"{index_path} puts {absent[0]} in {weight_map[absent[0]]}, which does not hold it: the shards are "
            "inconsistent, re-download them"
        )
    return state


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise MptlikeError(
                f"{path} is not a readable safetensors file ({short_error(exc)}): re-download it"
            ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        raise MptlikeError(
            f"{path} is not a readable PyTorch weights file ({short_error(exc)}); only plain tensors are loaded "
            "(weights_only), re-download it or convert it to safetensors"
        ) from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise MptlikeError(f"{path} does not hold a flat name -> tensor state dict: re-export it with save_pretrained")
    return loaded


def write_hf_folder(
    out: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """config.json plus safetensors into an existing (staging) folder; returns the weight file names."""
    from safetensors.torch import save_file

    shards = _plan_shards(state, max_shard_bytes)
    names = []
    if len(shards) == 1:
        save_file(_unshared(shards[0]), str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
        names.append(SAFETENSORS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(_unshared(shard), str(out / name), metadata={"format": "pt"})
            weight_map.update({tensor_name: name for tensor_name in shard})
            names.append(name)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        names.append(SAFETENSORS_INDEX)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return names


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most max_bytes each (a bigger tensor gets a shard alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights loaded from a .bin, views).
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen:
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def copy_tokenizer_files(sources: list[Path], out: Path) -> list[str]:
    """Copy tokenizer files into `out`; returns the names written."""
    written = []
    for path in sources:
        if path.is_file() and path.name in TOKENIZER_FILES and path.name not in written:
            shutil.copyfile(path, out / path.name)
            written.append(path.name)
    return written


def tokenizer_files_in(folder: Path) -> list[Path]:
    """The tokenizer files a folder holds (empty when it has no tokenizer.json)."""
    if not (folder / TOKENIZER_JSON).is_file():
        return []
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def write_tokenizer_config(out: Path, *, eos_token: str | None, model_max_length: int) -> None:
    """The small tokenizer_config.json that lets AutoTokenizer load a bare tokenizer.json offline."""
    values: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if eos_token is not None:
        values["eos_token"] = eos_token
    (out / "tokenizer_config.json").write_text(json.dumps(values, indent=2) + "\n")
