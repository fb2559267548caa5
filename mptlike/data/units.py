"""Prep's work units: fixed pieces of the input, tokenized anywhere, kept on disk until the manifest.

The inputs, in the order prep reads them, are cut into units that depend only on the files
themselves (names, sizes, modification times, parquet row groups) and the unit size, never on how
many processes or machines do the work:

- a `.jsonl` file is cut into byte ranges of `unit_bytes`; a range holds the lines that *start*
  in it, so every line belongs to exactly one range wherever the cut falls;
- a `.parquet` file into its row groups;
- any other file is one document and one piece;

and consecutive pieces are grouped, in order, into units of at least `unit_bytes` (a unit never
mixes training files with `--val` files). A unit's tokens, EOS after every document, go to
`<key>.bin` in the folder's work area (`.prep-work/`), followed by each document's token count,
and only then its record `<key>.json` (token and document counts, sha256 of the .bin) is written:
a unit counts as done exactly when its record exists and the .bin matches it. The key hashes
what decides the tokens: the tokenizer's content, the text field, the dtype and every piece with
its file's size and mtime, so a unit made from other inputs or another tokenizer is never reused.

The split into train and val documents is not part of a unit: prep decides it while it copies the
units, in order, into the shards, so val_fraction, seed and shard size can change and still reuse
finished units.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mptlike import faults
from mptlike.data.corpus import open_parquet, read_documents
from mptlike.data.manifest import dtype_for_vocab
from mptlike.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from mptlike.errors import MptlikeError
from mptlike.files import atomic_write, temp_name

WORK_DIR = ".prep-work"
UNIT_FORMAT = 1
# Enough units to keep every worker busy to the end (and to lose little to a kill), few enough that
# their files and records cost nothing next to tokenizing them: 256 KiB to 64 MiB of input each.
MIN_UNIT_BYTES = 1 << 18
MAX_UNIT_BYTES = 1 << 26
TARGET_UNITS = 1024
# Text per encode_batch call: many documents keep the tokenizers library's threads busy, and the cap
# bounds the Python lists of ids it returns.
_ENCODE_CHARS = 1 << 22
_LENGTH_DTYPE = np.dtype("<u8")


def default_unit_bytes(files: Sequence[Path]) -> int:
    """Unit size for these inputs: about TARGET_UNITS units, each MIN_UNIT_BYTES to MAX_UNIT_BYTES."""
    total = sum(p.stat().st_size for p in files)
    return max(MIN_UNIT_BYTES, min(MAX_UNIT_BYTES, total // TARGET_UNITS))


@dataclass(frozen=True)
class Piece:
    """A part of one input file: a jsonl byte range, parquet row groups, or the whole file."""

    path: str  # absolute: workers on other machines open the same path
    size: int
    mtime_ns: int
    start: int = 0
    end: int | None = None
    row_groups: tuple[int, ...] | None = None
    weight: int = 0  # input bytes it stands for (progress and unit sizes)

    def identity(self) -> list:
        return [self.path, self.size, self.mtime_ns, self.start, self.end,
                None if self.row_groups is None else list(self.row_groups)]

    def documents(self, text_field: str):
        p = Path(self.path)
        try:
            st = p.stat()
        except OSError:
            st = None
        if st is None or (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            raise MptlikeError(
                f"Input {p} changed or vanished while mptlike-prep ran (or differs on this machine); "
                "rerun mptlike-prep once the inputs stay put, on a file system every worker sees."
            )
        return read_documents(p, text_field, start=self.start, end=self.end, row_groups=self.row_groups)


@dataclass(frozen=True)
class Unit:
    index: int
    split: str  # "train" (may be split by val_fraction later) or "val" (a --val input)
    pieces: tuple[Piece, ...]
    text_field: str = "text"
    key: str = ""

    @property
    def weight(self) -> int:
        return sum(p.weight for p in self.pieces)


def _pieces(path: Path, unit_bytes: int) -> list[Piece]:
    st = path.stat()
    base = dict(path=str(path.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [Piece(**base, start=a, end=min(a + unit_bytes, st.st_size), weight=min(unit_bytes, st.st_size - a))
                for a in range(0, st.st_size, unit_bytes)]
    if suffix == ".parquet":
        meta = open_parquet(path).metadata
        return [Piece(**base, row_groups=(i,), weight=max(1, meta.row_group(i).total_byte_size))
                for i in range(meta.num_row_groups)]
    return [Piece(**base, weight=st.st_size)]


def plan_units(train: Sequence[Path], val: Sequence[Path], unit_bytes: int, text_field: str) -> list[Unit]:
    """The work units of these inputs, in reading order; keys are filled in by `with_keys`."""
    units: list[Unit] = []
    for split, files in (("train", train), ("val", val)):
        current: list[Piece] = []
        weight = 0
        for path in files:
            for piece in _pieces(path, unit_bytes):
                current.append(piece)
                weight += piece.weight
                if weight >= unit_bytes:
                    units.append(Unit(len(units), split, tuple(current), text_field))
                    current, weight = [], 0
        if current:
            units.append(Unit(len(units), split, tuple(current), text_field))
    return units


def with_keys(units: Sequence[Unit], tokenizer_digest: str, dtype: str) -> list[Unit]:
    """The units with their keys: a hash of everything that decides their tokens."""
    out = []
    for u in units:
        blob = {"format": UNIT_FORMAT, "tokenizer": tokenizer_digest, "text_field": u.text_field,
                "dtype": dtype, "pieces": [p.identity() for p in u.pieces]}
        key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]
        out.append(Unit(u.index, u.split, u.pieces, u.text_field, key))
    return out


# ----------------------------------------------------------------------------- tokenizer in workers


@dataclass(frozen=True)
class TokenizerPayload:
    """What a worker needs to rebuild the run's tokenizer without files or network."""

    name: str
    eos_id: int
    json: str | None  # tokenizer.json content; None for the byte tokenizer
    digest: str

    @classmethod
    def of(cls, tok: Tokenizer) -> TokenizerPayload:
        if isinstance(tok, HFTokenizer):
            text = tok.tok.to_str()
            digest = hashlib.sha256(f"{tok.eos_id}\n{text}".encode()).hexdigest()
            return cls(tok.name, tok.eos_id, text, digest)
        return cls(tok.name, tok.eos_id, None, "bytes")

    def build(self) -> Tokenizer:
        if self.json is None:
            return ByteTokenizer()
        from tokenizers import Tokenizer as _Tok

        return HFTokenizer(_Tok.from_str(self.json), self.name, self.eos_id)


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def worker_tokenizer(payload: TokenizerPayload) -> Tokenizer:
    """This process's copy of the tokenizer, built on first use."""
    tok = _WORKER_TOKENIZERS.get(payload.digest)
    if tok is None:
        tok = _WORKER_TOKENIZERS[payload.digest] = payload.build()
    return tok


def cached_worker_tokenizer(digest: str) -> Tokenizer | None:
    return _WORKER_TOKENIZERS.get(digest)


def init_pool_worker(payload: TokenizerPayload, threads: int) -> None:
    """ProcessPoolExecutor initializer: tokenizer threads, the tokenizer, and a parent watch."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the tokenizers pool first starts
    # Ctrl-C reaches the whole process group; the parent alone handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_tokenizer(payload)
    parent = os.getppid()

    def watch() -> None:
        # A parent killed with SIGKILL cannot stop its workers; they stop themselves.
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="prep-parent-watch", daemon=True).start()


def pool_task(unit: Unit, work_dir: str, digest: str) -> dict:
    tok = cached_worker_tokenizer(digest)
    if tok is None:  # the initializer always builds it; this would be a bug
        raise RuntimeError(f"prep worker {os.getpid()} has no tokenizer {digest}")
    return tokenize_unit(unit, Path(work_dir), tok, digest)


# ------------------------------------------------------------------------------ making one unit


def unit_names(key: str) -> tuple[str, str]:
    return f"{key}.bin", f"{key}.json"


def unit_paths(work_dir: Path, key: str) -> tuple[Path, Path]:
    return tuple(work_dir / n for n in unit_names(key))


def _batches(docs: Iterator[tuple[int, str]]) -> Iterator[list[tuple[int, str]]]:
    batch, chars = [], 0
    for item in docs:
        batch.append(item)
        chars += len(item[1])
        if chars >= _ENCODE_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _UnitFile:
    """One unit's `.bin` being written under a temporary name, hashed on the way."""

    def __init__(self, unit: Unit, work_dir: Path, dtype: np.dtype) -> None:
        self.unit, self.dtype = unit, dtype
        self.bin_path, self.rec_path = unit_paths(work_dir, unit.key)
        self.tmp = temp_name(self.bin_path)
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.lengths: list[np.ndarray] = []
        self.num_tokens = 0

    def _write(self, buf: bytes) -> None:
        self.file.write(buf)
        self.hash.update(buf)

    def add(self, arrays: Sequence[np.ndarray], eos: np.ndarray) -> None:
        parts = []
        for a in arrays:
            parts += [np.asarray(a).astype(self.dtype, copy=False), eos]
        joined = np.concatenate(parts)
        self._write(joined.tobytes())
        self.num_tokens += joined.size
        self.lengths.append(np.array([a.size + 1 for a in arrays], dtype=_LENGTH_DTYPE))

    def finish(self, digest: str) -> dict:
        """Lengths after the tokens, fsync, rename; then the record that marks the unit done."""
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, _LENGTH_DTYPE)
        self._write(lengths.tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.bin_path)
        record = {
            "format": UNIT_FORMAT, "key": self.unit.key, "index": self.unit.index, "tokenizer": digest,
            "dtype": self.dtype.name, "num_tokens": int(self.num_tokens), "num_documents": int(lengths.size),
            "sha256": self.hash.hexdigest(), "pid": os.getpid(),
        }
        atomic_write(self.rec_path, json.dumps(record) + "\n")
        delay = faults.active().prep_unit_delay_s  # tests only: a kill lands part-way through a run
        if delay:
            time.sleep(delay)
        return record

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def tokenize_units(group: Sequence[Unit], work_dir: Path, tok: Tokenizer, digest: str) -> list[dict]:
    """Tokenize consecutive units into their `<key>.bin` files and records; returns the records.

    The documents of the whole group stream through encode_batch together (many documents per call
    keep the tokenizers library's threads busy even when units are small), and each unit's file is
    finished as soon as its last document is encoded, so a kill loses at most the units in flight.
    """
    dtype = np.dtype(dtype_for_vocab(tok.vocab_size)).newbyteorder("<")
    eos = np.array([tok.eos_id], dtype=dtype)
    files: dict[int, _UnitFile] = {}
    records: list[dict] = []

    def finish_before(i: int) -> None:  # every unit before the i-th has all its documents
        while len(records) < i:
            j = len(records)
            uf = files.pop(j, None) or _UnitFile(group[j], work_dir, dtype)
            records.append(uf.finish(digest))

    docs = ((i, d.text) for i, u in enumerate(group) for p in u.pieces for d in p.documents(u.text_field))
    try:
        for batch in _batches(docs):
            arrays = tok.encode_batch([text for _, text in batch])
            start = 0
            for k in range(1, len(batch) + 1):
                if k == len(batch) or batch[k][0] != batch[start][0]:
                    i = batch[start][0]
                    finish_before(i)
                    if i not in files:
                        files[i] = _UnitFile(group[i], work_dir, dtype)
                    files[i].add(arrays[start:k], eos)
                    start = k
        finish_before(len(group))
    except BaseException:
        for uf in files.values():
            uf.discard()
        raise
    return records


def tokenize_unit(unit: Unit, work_dir: Path, tok: Tokenizer, digest: str) -> dict:
    """Tokenize one unit into `<key>.bin`, then write its record; returns the record."""
    return tokenize_units([unit], work_dir, tok, digest)[0]


# ------------------------------------------------------------------------- the work area on disk


class UnitStore:
    """`.prep-work/` under the output folder: finished units and the trained BPE of an interrupted run."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / WORK_DIR

    def create(self) -> None:
        self.dir.mkdir(exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def finished(self, units: Sequence[Unit], dtype: str) -> dict[str, dict]:
        """Records of the units already done; deletes every other file (stale or half-written)."""
        itemsize = np.dtype(dtype).itemsize
        done: dict[str, dict] = {}
        for u in units:
            bin_path, rec_path = unit_paths(self.dir, u.key)
            try:
                rec = json.loads(rec_path.read_text(encoding="utf-8"))
                ok = (
                    rec.get("format") == UNIT_FORMAT and rec.get("key") == u.key and rec.get("dtype") == dtype
                    and bin_path.stat().st_size == rec["num_tokens"] * itemsize + rec["num_documents"] * 8
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                ok = False
            if ok:
                done[u.key] = rec
        keep = {n for k in done for n in unit_names(k)} | set(_BPE_FILES)
        for p in self.dir.iterdir():
            if p.name in keep:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return done

    def load(self, unit: Unit, record: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """A finished unit's tokens and per-document lengths, or None when its file is damaged."""
        bin_path, _ = unit_paths(self.dir, unit.key)
        try:
            data = bin_path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            return None
        dtype = np.dtype(record["dtype"]).newbyteorder("<")
        n = record["num_tokens"]
        tokens = np.frombuffer(data, dtype=dtype, count=n)
        lengths = np.frombuffer(data, dtype=_LENGTH_DTYPE, offset=n * dtype.itemsize)
        if lengths.size != record["num_documents"] or int(lengths.sum()) != n:
            return None
        return tokens, lengths

    # A BPE trained on the corpus is kept here too, so a resumed run does not train it again.
    def load_bpe(self, key: str) -> str | None:
        tok_file, key_file = (self.dir / n for n in _BPE_FILES)
        try:
            if key_file.read_text(encoding="utf-8").strip() == key:
                return tok_file.read_text(encoding="utf-8")
        except OSError:
            pass
        return None

    def save_bpe(self, key: str, tok_json: str) -> None:
        tok_file, key_file = (self.dir / n for n in _BPE_FILES)
        key_file.unlink(missing_ok=True)
        atomic_write(tok_file, tok_json)
        atomic_write(key_file, key + "\n")


_BPE_FILES = ("bpe-tokenizer.json", "bpe-tokenizer.key")
