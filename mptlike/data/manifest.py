"""The manifest: what a prepared data folder holds and how to read it back.

A data folder is valid only when `manifest.json` exists; prep writes it last, so a folder
without one is an interrupted run and is never read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mptlike.errors import MptlikeError
from mptlike.files import atomic_write

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")

_PREP_HINT = "run `mptlike-prep INPUT... --out {dir} --tokenizer bytes` (or `--default-corpus`)"


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id of a vocabulary of this size."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass
class ShardInfo:
    name: str
    num_tokens: int
    sha256: str


@dataclass
class Manifest:
    tokenizer: str
    vocab_size: int
    eos_id: int
    dtype: str
    num_tokens: dict[str, int]
    num_documents: dict[str, int]
    shards: dict[str, list[ShardInfo]]
    sources: list[str]
    fingerprint: str = ""
    tokenizer_file: str | None = None
    format_version: int = FORMAT_VERSION
    # Where the manifest was read from; not stored in the file.
    path: Path | None = field(default=None, compare=False)

    @property
    def data_dir(self) -> Path | None:
        return None if self.path is None else self.path.parent

    @property
    def splits(self) -> list[str]:
        return [s for s in self.shards if self.num_tokens.get(s, 0) > 0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None, where: str | None = None) -> Manifest:
        """`where` names the manifest in error lines (default: `path`), e.g. the URL of a remote one."""
        where = where or path or "manifest"
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise MptlikeError(
                f"{where} has format_version {version!r} but this mptlike reads version "
                f"{FORMAT_VERSION}; re-run mptlike-prep to rebuild the data folder."
            )
        try:
            shards = {
                split: [ShardInfo(**s) for s in items] for split, items in d["shards"].items()
            }
            m = cls(
                tokenizer=str(d["tokenizer"]),
                vocab_size=int(d["vocab_size"]),
                eos_id=int(d["eos_id"]),
                dtype=str(d["dtype"]),
                num_tokens={k: int(v) for k, v in d["num_tokens"].items()},
                num_documents={k: int(v) for k, v in d["num_documents"].items()},
                shards=shards,
                sources=list(d.get("sources", [])),
                fingerprint=str(d.get("fingerprint", "")),
                tokenizer_file=d.get("tokenizer_file"),
                format_version=version,
                path=path,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MptlikeError(
                f"{where} is missing or has a malformed field ({e!r}); re-run mptlike-prep."
            ) from None
        m._validate(where)
        return m

    def _validate(self, where: object) -> None:
        if self.dtype not in ("uint16", "uint32"):
            raise MptlikeError(f"{where} has dtype {self.dtype!r}; re-run mptlike-prep.")
        if np.iinfo(self.dtype).max < self.vocab_size - 1:
            raise MptlikeError(
                f"{where} stores vocab_size {self.vocab_size} as {self.dtype}, which cannot hold "
                "every id; re-run mptlike-prep."
            )
        for split, items in self.shards.items():
            total = sum(s.num_tokens for s in items)
            if total != self.num_tokens.get(split, 0):
                raise MptlikeError(
                    f"{where} lists {total} tokens in the {split!r} shards but num_tokens says "
                    f"{self.num_tokens.get(split, 0)}; re-run mptlike-prep."
                )

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> Manifest:
        """Read `manifest.json` from a data folder (or the file itself)."""
        p = Path(data_dir)
        if p.name == MANIFEST_NAME and p.is_file():
            p = p.parent
        if not p.is_dir():
            raise MptlikeError(
                f"Data folder {p} does not exist; {_PREP_HINT.format(dir=p)} to create it."
            )
        mpath = p / MANIFEST_NAME
        if not mpath.is_file():
            raise MptlikeError(
                f"Data folder {p} has no {MANIFEST_NAME} (preparation never finished there); "
                f"{_PREP_HINT.format(dir=p)} to (re)build it."
            )
        try:
            d = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MptlikeError(
                f"{mpath} is not valid JSON ({e}); delete it and re-run mptlike-prep."
            ) from None
        if not isinstance(d, dict):
            raise MptlikeError(f"{mpath} is not a JSON object; delete it and re-run mptlike-prep.")
        return cls.from_dict(d, path=mpath)

    def save(self, data_dir: str | os.PathLike) -> Path:
        """Write atomically: a reader sees the old manifest, no manifest, or the new one."""
        out = Path(data_dir) / MANIFEST_NAME
        atomic_write(out, json.dumps(self.to_dict(), indent=2) + "\n")
        self.path = out
        return out


def check_compatible(
    manifest: Manifest, vocab_size: int | None = None, tokenizer: str | None = None
) -> None:
    """Refuse a model or tokenizer request that cannot consume this data.

    `vocab_size` is the model's (possibly padded) vocabulary; it must cover every token id.
    `tokenizer` is the spec the user asked for; it must be the one the shards were made with.
    """
    where = manifest.data_dir or "the data folder"
    if tokenizer is not None and tokenizer != manifest.tokenizer:
        raise MptlikeError(
            f"Data in {where} was tokenized with {manifest.tokenizer!r} but tokenizer "
            f"{tokenizer!r} was requested; re-run mptlike-prep with --tokenizer {tokenizer} "
            "into another folder or request the tokenizer the data was made with."
        )
    if vocab_size is not None and vocab_size < manifest.vocab_size:
        raise MptlikeError(
            f"model.vocab_size={vocab_size} is smaller than the vocabulary of the tokenizer "
            f"{manifest.tokenizer!r} used for {where} ({manifest.vocab_size} ids); set "
            f"model.vocab_size to at least {manifest.vocab_size}."
        )
