"""`mptlike-prep`: raw text in, token shards and a manifest out.

Documents are tokenized in order and each is followed by EOS, so a split is the single token
stream MPT was pretrained on. Everything is written under temporary names and only renamed into
place once every shard is complete; the manifest comes last. A run that fails or is killed
leaves no manifest (the folder does not count as prepared) and the previous contents intact
until the final renames, and a rerun with the same inputs and options does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mptlike.data.corpus import Document, expand_inputs, read_documents, stdlib_files, stdlib_root
from mptlike.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    dtype_for_vocab,
)
from mptlike.data.sampler import splitmix64
from mptlike.data.shards import ShardWriter, remove_stale_tmp
from mptlike.data.tokenizer import (
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    parse_bpe_spec,
    train_bpe,
)
from mptlike.errors import EXIT_USAGE, MptlikeError

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_CORPUS_VOCAB = 8192
STDLIB_SOURCE = "python-stdlib"
# BPE merges stop changing much long before this; the cap bounds training memory and time.
BPE_TRAIN_CHARS = 1 << 30
_BATCH_CHARS = 1 << 24  # large batches keep every thread busy despite a few huge documents
_BATCH_DOCS = 4096
_SHARD_FILE = re.compile(r"^(train|val)_\d{5}\.bin$")


def is_val_document(index: int, seed: int, fraction: float) -> bool:
    """Whether document `index` goes to the validation split: a keyed hash, stable across runs.

    Document 0 always stays in training so that a one-document corpus still trains.
    """
    if fraction <= 0 or index == 0:
        return False
    h = splitmix64((seed & ((1 << 64) - 1)) ^ splitmix64(index))
    return h < fraction * 2.0**64


def _file_stamp(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _tokenizer_stamp(spec: str) -> str:
    """What identifies the tokenizer's content: the file hash for local ones, else the spec."""
    if spec == "bytes" or spec.startswith("bpe:"):
        return spec
    local = Path(spec).expanduser()
    files = [local / TOKENIZER_FILE, local / "tokenizer_config.json"] if local.is_dir() else [local]
    h = hashlib.sha256(spec.encode())
    for f in files:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def _fingerprint(options: dict, train: list[Path], val: list[Path]) -> str:
    blob = {
        "format_version": FORMAT_VERSION,
        **options,
        "train": [_file_stamp(p) for p in train],
        "val": [_file_stamp(p) for p in val],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _is_complete(out: Path, fingerprint: str) -> Manifest | None:
    """The existing manifest when `out` already holds exactly this preparation."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        m = Manifest.load(out)
    except MptlikeError:
        return None
    if m.fingerprint != fingerprint:
        return None
    itemsize = np.dtype(m.dtype).itemsize
    for shards in m.shards.values():
        for s in shards:
            p = out / s.name
            if not p.is_file() or p.stat().st_size != s.num_tokens * itemsize:
                return None
    if m.tokenizer_file and not (out / m.tokenizer_file).is_file():
        return None
    return m


@dataclass
class _Inputs:
    """The resolved inputs of one run, in the order their documents are read."""

    train: list[Path]
    val: list[Path]
    text_field: str
    val_fraction: float
    seed: int
    label: str  # how errors name the inputs

    def documents(self) -> Iterator[tuple[str, Document]]:
        """(split, document) for every non-empty document; training inputs first."""
        index = 0
        for path in self.train:
            for doc in read_documents(path, self.text_field):
                held_out = not self.val and is_val_document(index, self.seed, self.val_fraction)
                index += 1
                yield ("val" if held_out else "train"), doc
        for path in self.val:
            for doc in read_documents(path, self.text_field):
                yield "val", doc

    def total_bytes(self) -> int | None:
        files = self.train + self.val
        # Parquet sizes are compressed, so they say nothing about the text inside.
        if any(p.suffix == ".parquet" for p in files):
            return None
        return sum(p.stat().st_size for p in files)

    def empty_error(self) -> MptlikeError:
        return MptlikeError(
            f"Inputs {self.label} hold no text (0 non-empty documents); give mptlike-prep files "
            "with text in them."
        )


def _batches(docs: Iterator[tuple[str, Document]]) -> Iterator[list[tuple[str, Document]]]:
    batch, chars = [], 0
    for item in docs:
        batch.append(item)
        chars += len(item[1].text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _progress(enabled: bool | None, total: int | None):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
        disable=not enabled, dynamic_ncols=True,
    )


def _describe(inputs: Sequence[object]) -> str:
    names = [str(x) for x in inputs]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def prepare(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: str = "bytes",
    *,
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    val_inputs: Sequence[str | os.PathLike] = (),
    default_corpus: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    seed: int = 0,
    progress: bool | None = None,
) -> Manifest:
    """Tokenize the inputs into `out_dir` and return its manifest (a no-op when up to date).

    `val_inputs`, when given, are the validation split and `val_fraction` is ignored; otherwise
    a `val_fraction` share of documents, picked by a hash of (document index, seed), is held out.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MptlikeError(f"--val-fraction {val_fraction} must lie in [0, 1); e.g. 0.01.")
    if shard_tokens < 1:
        raise MptlikeError(f"--shard-tokens {shard_tokens} must be a positive number of tokens.")
    bpe_vocab = parse_bpe_spec(tokenizer)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise MptlikeError(f"Output {out} exists and is not a folder; choose another --out.")
    if not inputs and not default_corpus:
        raise MptlikeError("No inputs given; name text files or folders, or pass --default-corpus.")
    train_files = expand_inputs(inputs) + (stdlib_files() if default_corpus else [])
    val_files = expand_inputs(val_inputs) if val_inputs else []
    if val_files:
        val_fraction = 0.0
    options = {
        "tokenizer": tokenizer,
        "tokenizer_content": _tokenizer_stamp(tokenizer),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
    }
    fingerprint = _fingerprint(options, train_files, val_files)
    existing = _is_complete(out, fingerprint)
    if existing is not None:
        log.info("%s is already prepared from these inputs; nothing to do.", out)
        return existing

    src = _Inputs(train_files, val_files, text_field, val_fraction, seed,
                  label=_describe(inputs or [STDLIB_SOURCE]))
    sources = [str(x) for x in inputs]
    sources += [f"{STDLIB_SOURCE}:{stdlib_root()}"] if default_corpus else []
    sources += [f"val:{x}" for x in val_inputs]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    splits = ["train"] + (["val"] if val_files or val_fraction > 0 else [])
    writers: dict[str, ShardWriter] = {}
    try:
        tok = _build_tokenizer(tokenizer, bpe_vocab, src)
        saved_tok = isinstance(tok, HFTokenizer)
        dtype = dtype_for_vocab(tok.vocab_size)
        writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in splits}
        num_docs = _tokenize(tok, src, writers, progress)
        if num_docs["train"] == 0:
            raise src.empty_error()
        if "val" in splits and num_docs["val"] == 0:
            log.warning("No document went to the validation split; raise --val-fraction.")
        manifest = Manifest(
            tokenizer=tokenizer,
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            dtype=dtype,
            num_tokens={s: w.num_tokens for s, w in writers.items()},
            num_documents=num_docs,
            shards={s: w.shards for s, w in writers.items()},
            sources=sources,
            fingerprint=fingerprint,
            tokenizer_file=TOKENIZER_FILE if saved_tok else None,
        )
        _commit(out, writers, tok if saved_tok else None, manifest)
    except BaseException:
        for w in writers.values():
            w.abort()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return manifest


def _build_tokenizer(spec: str, bpe_vocab: int | None, src: _Inputs) -> Tokenizer:
    if spec == "bytes":
        return ByteTokenizer()
    if bpe_vocab is None:
        # Never pick up a tokenizer.json left in the output folder: the spec names the source.
        return load_tokenizer(spec)
    log.info("Training a byte-level BPE of %d ids on the training documents.", bpe_vocab)
    seen = {"docs": 0, "chars": 0}

    def texts() -> Iterator[str]:
        for split, doc in src.documents():
            if split != "train":
                continue
            seen["docs"] += 1
            seen["chars"] += len(doc.text)
            yield doc.text
            if seen["chars"] >= BPE_TRAIN_CHARS:
                log.info("Trained the BPE on the first %d characters.", seen["chars"])
                return

    tok = train_bpe(texts(), bpe_vocab)
    if seen["docs"] == 0:
        raise src.empty_error()
    return tok


def _tokenize(
    tok: Tokenizer, src: _Inputs, writers: dict[str, ShardWriter], progress: bool | None
) -> dict[str, int]:
    """Encode every document, EOS after each, into its split's shards; documents per split."""
    num_docs = dict.fromkeys(writers, 0)
    eos = np.array([tok.eos_id], dtype=np.int64)
    tokens = 0
    with _progress(progress, src.total_bytes()) as bar:
        for batch in _batches(src.documents()):
            ids = tok.encode_batch([d.text for _, d in batch])
            parts: dict[str, list[np.ndarray]] = {s: [] for s in writers}
            for (split, _), arr in zip(batch, ids):
                parts[split] += [arr, eos]
                num_docs[split] += 1
            for split, arrays in parts.items():
                if arrays:
                    joined = np.concatenate(arrays)
                    writers[split].write(joined)
                    tokens += joined.size
            bar.update(sum(d.nbytes for _, d in batch))
            bar.set_postfix(docs=sum(num_docs.values()), tokens=tokens, refresh=False)
    for w in writers.values():
        w.close()
    return num_docs


def _commit(
    out: Path, writers: dict[str, ShardWriter], tok: HFTokenizer | None, manifest: Manifest
) -> None:
    # The old manifest goes first: between here and the new one the folder reads as unprepared.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for w in writers.values():
        w.commit()
    if tok is not None:
        tok.save(out / TOKENIZER_FILE)  # atomic: a reader sees the old file or the new one
    else:
        (out / TOKENIZER_FILE).unlink(missing_ok=True)
    keep = {s.name for shards in manifest.shards.values() for s in shards}
    for p in out.iterdir():
        if _SHARD_FILE.match(p.name) and p.name not in keep:
            p.unlink()
    manifest.save(out)


def prepare_default_corpus(
    out_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_CORPUS_VOCAB,
    *,
    progress: bool | None = None,
) -> Path:
    """Tokenize this Python's standard library with a BPE trained on it; returns the folder."""
    prepare([], out_dir, f"bpe:{vocab_size}", default_corpus=True, progress=progress)
    return Path(out_dir)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mptlike-prep",
        description="Tokenize text into token shards plus manifest.json for mptlike-train.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files or folders of .txt (one document per file), .jsonl, .parquet")
    p.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    p.add_argument("--tokenizer", default=None,
                   help="bytes | bpe:VOCAB (trained on the inputs) | path or hub name of a "
                        "tokenizer.json (default with --default-corpus: "
                        f"bpe:{DEFAULT_CORPUS_VOCAB})")
    p.add_argument("--text-field", default="text",
                   help="jsonl field / parquet column holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="share of documents held out for validation (default: %(default)s)")
    p.add_argument("--val", action="append", default=[], metavar="INPUT",
                   help="a validation input (repeatable); then --val-fraction is ignored")
    p.add_argument("--default-corpus", action="store_true",
                   help="add the Python standard library's .py files as training text")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer threads (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard file (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.workers is not None:
        # Read by the tokenizers library when its thread pool starts, i.e. on first use.
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, args.workers)))
    tokenizer = args.tokenizer
    if tokenizer is None:
        if not args.default_corpus:
            print("mptlike-prep: error: --tokenizer is required (bytes, bpe:VOCAB or a path); "
                  "e.g. --tokenizer bpe:8192.", file=sys.stderr)
            return EXIT_USAGE
        tokenizer = f"bpe:{DEFAULT_CORPUS_VOCAB}"
    try:
        m = prepare(
            args.inputs, args.out, tokenizer, text_field=args.text_field,
            val_fraction=args.val_fraction, val_inputs=args.val,
            default_corpus=args.default_corpus, shard_tokens=args.shard_tokens, seed=args.seed,
        )
    except MptlikeError as e:
        print(f"mptlike-prep: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mptlike-prep: interrupted before finishing; rerun the same command to prepare "
              f"{args.out}.", file=sys.stderr)
        return 130
    counts = ", ".join(
        f"{s}: {m.num_tokens[s]:,} tokens in {m.num_documents[s]:,} documents"
        for s in SPLITS if s in m.num_tokens
    )
    print(f"{m.data_dir}: {counts} ({m.tokenizer}, vocab {m.vocab_size}, {m.dtype})")
    return 0

