"""Fixed-length training samples read straight from memory-mapped token shards.

A split is one token stream: its shards concatenated in manifest order, documents separated
by EOS. Sample i is the window tokens[i*S : i*S + S + 1], so consecutive samples share one
boundary token and every token except the first is a label exactly once per epoch.

The folder may also be remote (s3://bucket/prefix, any fsspec URL) or the local view of one
(mptlike.data.remote): the shards are then mapped from the shard cache, fetched when first read
(mptlike.data.cache), and the loader's prefetcher asks `remote_shards` which ones come next.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mptlike.data.cache import RemoteShard, RemoteShards, ShardCache
from mptlike.data.manifest import Manifest, check_compatible
from mptlike.data.remote import RemoteSettings, is_remote, local_path, open_remote, read_view
from mptlike.errors import MptlikeError

_HASH_CHUNK = 1 << 24


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sequence_ids(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Document index of every position: a new id starts right after each EOS token.

    The EOS itself belongs to the document it ends, so masking attention by this id never lets
    a document see its predecessor.
    """
    eos = input_ids == eos_id
    return np.cumsum(eos, axis=-1, dtype=np.int64) - eos


class TokenDataset(Dataset):
    """Samples of `seq_len` inputs and `seq_len` shifted labels from one split of a data folder.

    Sizes of all shards are checked on construction; `verify=True` also hashes them against the
    manifest's sha256 (slow for large corpora). `expected_tokenizer` / `expected_vocab_size`
    make the dataset refuse data made with another tokenizer or a model too small for it.
    `data_dir` may be a URL, opened with `remote` (default: RemoteSettings(), the environment's
    cache folder); remote shards are verified as they are downloaded, so `verify` adds nothing there.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        seq_len: int = 2048,
        with_sequence_id: bool = False,
        verify: bool = False,
        *,
        expected_tokenizer: str | None = None,
        expected_vocab_size: int | None = None,
        remote: RemoteSettings | None = None,
    ) -> None:
        if is_remote(data_dir):
            data_dir = open_remote(str(data_dir), remote)
        self.data_dir = local_path(data_dir)
        self.manifest = Manifest.load(self.data_dir)
        view = read_view(self.data_dir)
        self.where = self.data_dir if view is None else view[0]  # what messages name: the folder or its URL
        check_compatible(self.manifest, expected_vocab_size, expected_tokenizer)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise MptlikeError(f"seq_len={seq_len!r} must be a positive integer.")
        if split not in self.manifest.shards:
            raise MptlikeError(
                f"Data folder {self.where} has no split {split!r} (it has "
                f"{sorted(self.manifest.shards)}); use one of those."
            )
        self.split = split
        self.seq_len = seq_len
        self.with_sequence_id = with_sequence_id
        self.eos_id = self.manifest.eos_id
        self._dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
        self._shards = self.manifest.shards[split]
        self._paths = [self.data_dir / s.name for s in self._shards]
        self._remote = None if view is None else RemoteShards(self.data_dir, *view, self.manifest, split)
        if self._remote is None:
            self._check_files(verify)
        sizes = np.array([s.num_tokens for s in self._shards], dtype=np.int64)
        # offsets[k] = position of shard k's first token in the split's stream.
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self._offsets[-1])
        self._len = max(0, (self.num_tokens - 1) // seq_len)
        if self._len == 0:
            raise MptlikeError(
                f"Split {split!r} of {self.where} has {self.num_tokens} tokens, fewer than "
                f"seq_len+1={seq_len + 1} needed for one sample; lower the sequence length "
                "(model.max_seq_len) or prepare more text."
            )
        self._maps: list[np.memmap] | RemoteShards | None = None

    @property
    def prefetch_depth(self) -> int:
        """Shards the loader's prefetcher keeps ahead of it (0: a local folder, nothing to fetch)."""
        return 0 if self._remote is None else self._remote.prefetch_depth

    def remote_shards(self, indices: Sequence[int] | np.ndarray) -> list[tuple[ShardCache, RemoteShard]]:
        """The remote shards these samples read, in the order they are first read; none for a local folder."""
        if self._remote is None:
            return []
        starts = np.asarray(indices, dtype=np.int64).reshape(-1) * self.seq_len
        ks = self._remote.shards_of(starts, self._offsets, self.seq_len + 1)
        return [(self._remote.cache, self._remote.shards[k]) for k in ks]

    def _check_files(self, verify: bool) -> None:
        itemsize = self._dtype.itemsize
        for info, path in zip(self._shards, self._paths):
            if not path.is_file():
                raise MptlikeError(
                    f"Shard {path} listed in the manifest is missing; re-run mptlike-prep "
                    f"for {self.data_dir}."
                )
            size = path.stat().st_size
            if size != info.num_tokens * itemsize:
                raise MptlikeError(
                    f"Shard {path} is {size} bytes but the manifest expects "
                    f"{info.num_tokens * itemsize} ({info.num_tokens} {self._dtype} tokens); it is "
                    f"truncated or corrupt, re-run mptlike-prep for {self.data_dir}."
                )
            if verify and sha256_file(path) != info.sha256:
                raise MptlikeError(
                    f"Shard {path} does not match its sha256 in the manifest (corrupt file); "
                    f"re-run mptlike-prep for {self.data_dir}."
                )

    def __getstate__(self) -> dict:
        # Memory maps pickle as full copies; workers reopen them instead.
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def _open(self) -> list[np.memmap] | RemoteShards:
        if self._maps is None and self._remote is not None:
            self._maps = self._remote  # maps each shard when first read, from the cache
        if self._maps is None:
            # np.memmap refuses empty files, and an empty shard holds nothing to map.
            self._maps = [
                np.memmap(p, dtype=self._dtype, mode="r")
                if s.num_tokens
                else np.empty(0, self._dtype)
                for p, s in zip(self._paths, self._shards)
            ]
        return self._maps

    def __len__(self) -> int:
        return self._len

    def _fill(self, out: np.ndarray, start: int) -> None:
        """Copy the stream positions [start, start + len(out)) into `out`, across shards."""
        maps = self._open()
        k = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos, n = start, len(out)
        filled = 0
        while filled < n:
            local = pos - int(self._offsets[k])
            take = min(n - filled, int(self._offsets[k + 1]) - pos)
            out[filled : filled + take] = maps[k][local : local + take]
            filled += take
            pos += take
            k += 1

    def windows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(B, seq_len + 1) int64 token windows for the given sample indices."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"sample index out of range [0, {self._len}) in {self.where}")
        out = np.empty((idx.size, self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(idx.tolist()):
            self._fill(out[row], i * self.seq_len)
        # A damaged shard holds ids the tokenizer never made; caught here (one max over the batch),
        # they would otherwise index past the embedding mid-run. data.verify checks every byte upfront.
        if out.size and out.max() >= self.manifest.vocab_size:
            row = int(np.argmax(out.max(axis=1)))
            raise MptlikeError(
                f"sample {int(idx[row])} of {self.where} ({self.split}) holds token id {int(out[row].max())}, "
                f"beyond the tokenizer's {self.manifest.vocab_size} ids: a shard is damaged; find it with "
                f"data.verify=true (checksums) and re-run mptlike-prep"
            )
        return out

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Stacked samples: input_ids and labels (B, seq_len) int64, optionally sequence_id."""
        w = self.windows(indices)
        # One allocation for all fields: a worker process then ships a single shared-memory
        # block per batch instead of one per field. Each field is a contiguous slab of it.
        fields = 3 if self.with_sequence_id else 2
        block = np.empty((fields, *w.shape[:1], self.seq_len), dtype=np.int64)
        block[0] = w[:, :-1]
        block[1] = w[:, 1:]
        if self.with_sequence_id:
            block[2] = sequence_ids(block[0], self.eos_id)
        t = torch.from_numpy(block)
        batch = {"input_ids": t[0], "labels": t[1]}
        if self.with_sequence_id:
            batch["sequence_id"] = t[2]
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample index {i} out of range [0, {self._len})")
        return {k: v[0] for k, v in self.get_batch([i]).items()}
