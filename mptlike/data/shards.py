"""Writing token shards: fixed-size raw little-endian arrays, hashed while they are written.

Shards go to hidden temporary names first; `commit()` renames them into place. Prep commits
only after every shard of every split is complete, then writes the manifest, so an
interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from mptlike.data.manifest import Manifest, ShardInfo, dtype_for_vocab

TMP_SUFFIX = ".tmp"
_TMP_PATTERN = re.compile(r"^\..+\.tmp$")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_SUFFIX}")


def remove_stale_tmp(out_dir: Path) -> None:
    """Delete temporaries left by a run that was killed before it could clean up."""
    for p in out_dir.iterdir():
        if p.is_file() and _TMP_PATTERN.match(p.name):
            p.unlink(missing_ok=True)


class ShardWriter:
    """Appends token arrays to `split_00000.bin`, `split_00001.bin`, ... of `shard_tokens` each."""

    def __init__(self, out_dir: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.out_dir, self.split = out_dir, split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self.tmp_files: list[Path] = []
        self._file = None
        self._hash = None
        self._count = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards) + self._count

    def _open_next(self) -> None:
        path = tmp_path(self.out_dir / shard_name(self.split, len(self.shards)))
        self.tmp_files.append(path)
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.split, len(self.shards))
        self.shards.append(ShardInfo(name, self._count, self._hash.hexdigest()))
        self._file = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        data = np.asarray(tokens).astype(self.dtype, copy=False)
        while data.size:
            if self._file is None:
                self._open_next()
            take = min(data.size, self.shard_tokens - self._count)
            buf = data[:take].tobytes()
            self._file.write(buf)
            self._hash.update(buf)
            self._count += take
            data = data[take:]
            if self._count == self.shard_tokens:
                self._close_current()

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return self.shards

    def commit(self) -> None:
        """Move the finished shards to their final names."""
        for tmp in self.tmp_files:
            os.replace(tmp, tmp.with_name(tmp.name[1 : -len(TMP_SUFFIX)]))
        self.tmp_files = []

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for tmp in self.tmp_files:
            tmp.unlink(missing_ok=True)
        self.tmp_files = []


def write_token_folder(
    out_dir: str | os.PathLike,
    splits: dict[str, list[np.ndarray]],
    *,
    tokenizer: str,
    vocab_size: int,
    eos_id: int,
    num_documents: dict[str, int] | None = None,
    shard_tokens: int = 1 << 27,
    sources: list[str] | None = None,
) -> Path:
    """Write already-tokenized arrays as a complete data folder (shards + manifest).

    For programmatic use and tests; `mptlike-prep` is the way from raw text.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in splits}
    try:
        for split, arrays in splits.items():
            for a in arrays:
                writers[split].write(a)
            writers[split].close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.commit()
    manifest = Manifest(
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        eos_id=eos_id,
        dtype=dtype,
        num_tokens={s: w.num_tokens for s, w in writers.items()},
        num_documents=dict(num_documents or {s: len(a) for s, a in splits.items()}),
        shards={s: w.shards for s, w in writers.items()},
        sources=list(sources or []),
    )
    manifest.save(out)
    return out
