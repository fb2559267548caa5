"""`mptlike-prep`: raw text in, token shards and a manifest out.

Each document is followed by EOS, in input order, so a split is the single token stream MPT was
pretrained on. The inputs are cut into work units that depend only on the files (see
`mptlike.data.units`); the units are tokenized in this process, by `--workers N` local processes
or as Ray tasks, each into its own file under `.prep-work/` in the output folder, and this process
copies them into the shards in input order, deciding train or val per document on the way. So the
shards and the manifest are the same bytes whatever the number of workers or the executor.

Shards are written under temporary names and only renamed into place once every shard is
complete; the manifest comes last and `.prep-work/` is removed after it. A run that is killed or
interrupted leaves no manifest (the folder does not count as prepared), the previous contents
intact until the final renames, and its finished units in `.prep-work/`: a rerun with the same
inputs and tokenizer tokenizes only the units that were not finished. A run that fails on bad
input removes `.prep-work/`. A rerun of a finished preparation with the same inputs and options
does nothing.

`--out s3://bucket/prefix` (any fsspec URL) prepares into a local staging folder under the cache
(mptlike.data.remote.staging_dir), with all of the above, then uploads the shards and the tokenizer
and writes the manifest last; the staging folder goes once the upload has finished. An interrupted
upload resumes with what is not in the bucket yet; a rerun whose manifest is already in the bucket,
from the same inputs and options, does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mptlike.data import remote, units
from mptlike.data.corpus import Document, expand_inputs, read_documents, stdlib_files, stdlib_root
from mptlike.data.executors import InProcess, ProcessPool, RayExecutor, local_cores, ray_missing_error
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
    BPE_EOS,
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
EXECUTORS = ("local", "ray")
_SHARD_FILE = re.compile(r"^(train|val)_\d{5}\.bin$")


def default_corpus_dir(vocab_size: int) -> Path:
    """Where the default corpus with a BPE of `vocab_size` is prepared: $MPTLIKE_DATA (else ./data)."""
    return Path(os.environ.get("MPTLIKE_DATA") or "data") / f"stdlib-bpe{vocab_size}"


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
    workers: int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    unit_bytes: int | None = None,
    storage: remote.RemoteSettings | None = None,
) -> Manifest:
    """Tokenize the inputs into `out_dir` and return its manifest (a no-op when up to date).

    `val_inputs`, when given, are the validation split and `val_fraction` is ignored; otherwise
    a `val_fraction` share of documents, picked by a hash of (document index, seed), is held out.

    `workers`: processes that tokenize (1: this one; 0: all local cores; None: 1 locally, the
    cluster's CPUs with Ray). `executor`: "local" or "ray" (`ray_address`: a cluster to join, else
    a local Ray is started). `unit_bytes`: input per work unit (default: 1/1024 of the input, 256 KiB
    to 64 MiB). None of these four changes the output, only how it is computed.

    `out_dir` may be a URL (s3://bucket/prefix): `storage` then says where the staging folder is (its
    cache_dir) and how to reach the bucket (storage_options, retries).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MptlikeError(f"--val-fraction {val_fraction} must lie in [0, 1); e.g. 0.01.")
    if shard_tokens < 1:
        raise MptlikeError(f"--shard-tokens {shard_tokens} must be a positive number of tokens.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise MptlikeError(
            f"--workers {workers} must be a number of processes (0 or auto: all {local_cores()} cores); e.g. "
            "--workers 4."
        )
    if executor not in EXECUTORS:
        raise MptlikeError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}; e.g. --executor local.")
    if ray_address and executor != "ray":
        raise MptlikeError("--ray-address is only used with --executor ray; add --executor ray or drop it.")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise ray_missing_error()
    if unit_bytes is not None and unit_bytes < 1:
        raise MptlikeError(f"unit_bytes {unit_bytes} must be a positive number of bytes.")
    bpe_vocab = parse_bpe_spec(tokenizer)
    url = str(out_dir).rstrip("/") if remote.is_remote(out_dir) else None
    storage = storage or remote.RemoteSettings()
    out = remote.staging_dir(url, storage) if url else remote.local_path(out_dir).expanduser()
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
    if url:
        uploaded = remote.remote_manifest(url, storage)
        if uploaded is not None and uploaded.fingerprint == fingerprint:
            remote.remove_staging(out)
            log.info("%s is already prepared from these inputs; nothing to do.", url)
            return uploaded
    existing = _is_complete(out, fingerprint)
    store = units.UnitStore(out)
    if existing is not None:
        store.remove()  # left only by a run killed between its manifest and this cleanup
        if url:  # prepared, not (all) uploaded: an interrupted upload
            return _upload(out, url, existing, storage)
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
    store.create()
    splits = ["train"] + (["val"] if val_files or val_fraction > 0 else [])
    writers: dict[str, ShardWriter] = {}
    try:
        if unit_bytes is None:
            unit_bytes = units.default_unit_bytes(train_files + val_files)
        plan = units.plan_units(train_files, val_files, unit_bytes, text_field)
        bpe_key = hashlib.sha256(json.dumps(
            [tokenizer, text_field, val_fraction, seed, bool(val_files), BPE_TRAIN_CHARS,
             [_file_stamp(p) for p in train_files]]).encode()).hexdigest()
        tok = _build_tokenizer(tokenizer, bpe_vocab, src, store, bpe_key)
        saved_tok = isinstance(tok, HFTokenizer)
        dtype = dtype_for_vocab(tok.vocab_size)
        payload = units.TokenizerPayload.of(tok)
        plan = units.with_keys(plan, payload.digest, dtype)
        writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in splits}
        route = _Router(writers, route_by_hash=not val_files and val_fraction > 0, seed=seed,
                        val_fraction=val_fraction)

        def executor_for(todo: int):
            n = workers
            if executor == "ray":
                return RayExecutor(payload, store.dir, n or 0, ray_address)
            n = local_cores() if n == 0 else (n or 1)
            n = min(n, todo)
            if n <= 1:
                return InProcess(tok, payload.digest, store.dir)
            return ProcessPool(payload, store.dir, n)

        _run_units(plan, store, dtype, executor_for, route, tok, payload.digest,
                   _progress(progress, src.total_bytes()))
        for w in writers.values():
            w.close()
        num_docs = route.num_docs
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
    except BaseException as exc:
        for w in writers.values():
            w.abort()
        # Bad input means the inputs must change, which makes every finished unit stale anyway; any
        # other failure (a signal, a full disk, a lost worker) keeps them for the rerun.
        if isinstance(exc, MptlikeError):
            store.remove()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    store.remove()
    return _upload(out, url, manifest, storage) if url else manifest


def _upload(staging: Path, url: str, manifest: Manifest, storage: remote.RemoteSettings) -> Manifest:
    """Upload a prepared staging folder to `url`, manifest last, then remove the staging folder."""
    remote.upload_folder(staging, url, manifest, storage)
    remote.remove_staging(staging)
    manifest.path = None  # it lives at the URL now
    return manifest


def _build_tokenizer(
    spec: str, bpe_vocab: int | None, src: _Inputs, store: units.UnitStore, bpe_key: str
) -> Tokenizer:
    if spec == "bytes":
        return ByteTokenizer()
    if bpe_vocab is None:
        # Never pick up a tokenizer.json left in the output folder: the spec names the source.
        return load_tokenizer(spec)
    cached = store.load_bpe(bpe_key)
    if cached is not None:
        from tokenizers import Tokenizer as _Tok

        log.info("Reusing the %s trained by an interrupted run on the same inputs.", spec)
        raw = _Tok.from_str(cached)
        return HFTokenizer(raw, spec, raw.token_to_id(BPE_EOS))
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
    store.save_bpe(bpe_key, tok.tok.to_str())
    return tok


class _Router:
    """Copies units into the shards in input order, sending each document to train or val."""

    def __init__(self, writers: dict[str, ShardWriter], route_by_hash: bool, seed: int, val_fraction: float) -> None:
        self.writers, self.route_by_hash = writers, route_by_hash
        self.seed, self.val_fraction = seed, val_fraction
        self.num_docs = dict.fromkeys(writers, 0)
        self.index = 0  # training-input documents seen so far: the key of the val hash
        self.tokens = 0

    def __call__(self, unit: units.Unit, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens += tokens.size
        if unit.split == "val" or not self.route_by_hash:
            self.writers[unit.split].write(tokens)
            self.num_docs[unit.split] += lengths.size
            if unit.split == "train":
                self.index += lengths.size
            return
        # Consecutive documents of the same split go to their writer as one slice.
        ends = np.cumsum(lengths, dtype=np.int64)
        run_start, current = 0, None
        for i in range(lengths.size):
            split = "val" if is_val_document(self.index + i, self.seed, self.val_fraction) else "train"
            self.num_docs[split] += 1
            if split != current:
                if current is not None:
                    self.writers[current].write(tokens[run_start:ends[i - 1]])
                    run_start = int(ends[i - 1])
                current = split
        if current is not None:
            self.writers[current].write(tokens[run_start:])
        self.index += lengths.size


def _run_units(
    plan: list[units.Unit],
    store: units.UnitStore,
    dtype: str,
    executor_for: Callable[[int], object],
    route: _Router,
    tok: Tokenizer,
    digest: str,
    bar,
) -> None:
    """Tokenize the units not finished yet (a bounded number in flight) and route all in order."""
    done = store.finished(plan, dtype)
    todo = [u for u in plan if u.key not in done]
    runner = executor_for(len(todo)) if todo else None
    mb = sum(u.weight for u in plan) / max(1, len(plan)) / 1e6
    log.info("%d work units of ~%.1f MB: %d to tokenize%s, %d reused from an interrupted run.",
             len(plan), mb, len(todo), f" ({_describe_runner(runner)})" if runner else "", len(done))
    handles: dict[str, object] = {}
    queue = iter(todo)
    tokenized = 0
    ok = False
    try:
        with bar:
            for unit in plan:
                while runner is not None and len(handles) < runner.window:
                    nxt = next(queue, None)
                    if nxt is None:
                        break
                    handles[nxt.key] = runner.submit(nxt)
                if unit.key in done:
                    data = store.load(unit, done[unit.key])
                    if data is None:
                        log.warning("Work unit %s of the interrupted run is damaged; tokenizing it again.", unit.key)
                        data = store.load(unit, units.tokenize_unit(unit, store.dir, tok, digest))
                        tokenized += 1
                else:
                    data = store.load(unit, runner.result(handles.pop(unit.key)))
                    tokenized += 1
                if data is None:
                    bin_path = units.unit_paths(store.dir, unit.key)[0]
                    raise MptlikeError(
                        f"Work unit {bin_path} was tokenized but is missing or damaged here; with --executor "
                        "ray, --out and the inputs must be on a file system every node mounts at the same path."
                    )
                route(unit, *data)
                bar.update(unit.weight)
                bar.set_postfix(docs=sum(route.num_docs.values()), tokens=route.tokens, refresh=False)
        ok = True
    finally:
        if runner is not None:
            runner.close(ok)
    log.info("Tokenized %d work units, reused %d.", tokenized, len(plan) - tokenized)


def _describe_runner(runner: object) -> str:
    if isinstance(runner, RayExecutor):
        return f"Ray, {runner.workers} at a time"
    if isinstance(runner, ProcessPool):
        return f"{runner.window // 2} worker processes"
    return "in this process"


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
    p.add_argument("--out", required=True,
                   help="output folder for shards and manifest.json, or a URL (s3://bucket/prefix, any fsspec URL: "
                        "prepared in a staging folder under --cache-dir, then uploaded, manifest last)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help=f"with a URL --out: where to stage (default: ${remote.CACHE_ENV}, else ~/.cache/mptlike; "
                        "with --executor ray on a cluster, a folder every node mounts); credentials and endpoint come "
                        "from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)")
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
    p.add_argument("--workers", default=None, metavar="N",
                   help="processes that tokenize: 1 (default with --executor local), 0 or auto (all local "
                        "cores); with --executor ray, tasks at a time (default: the cluster's CPUs)")
    p.add_argument("--executor", default="local", metavar="{local,ray}",
                   help="local processes (default), or Ray tasks (pip install 'mptlike[ray]'); same output "
                        "either way")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (e.g. auto or ray://head:10001; default: start a local Ray); "
                        "--out and the inputs must be on a file system every node mounts at the same path")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard file (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workers = _parse_workers(args.workers)
    if workers is False:
        print(f"mptlike-prep: error: --workers {args.workers} must be a number of processes, or 0 or auto for "
              f"all {local_cores()} cores; e.g. --workers 4.", file=sys.stderr)
        return EXIT_USAGE
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
            workers=workers, executor=args.executor, ray_address=args.ray_address,
            storage=remote.RemoteSettings(cache_dir=args.cache_dir),
        )
    except MptlikeError as e:
        print(f"mptlike-prep: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mptlike-prep: interrupted before finishing; rerun the same command to prepare "
              f"{args.out} (finished work units are kept and reused).", file=sys.stderr)
        return 130
    counts = ", ".join(
        f"{s}: {m.num_tokens[s]:,} tokens in {m.num_documents[s]:,} documents"
        for s in SPLITS if s in m.num_tokens
    )
    where = args.out if remote.is_remote(args.out) else m.data_dir
    print(f"{where}: {counts} ({m.tokenizer}, vocab {m.vocab_size}, {m.dtype})")
    return 0



def _parse_workers(raw: str | None) -> int | None | bool:
    """--workers as a count (0: all cores), None when not given, False when malformed."""
    if raw is None:
        return None
    if raw.strip().lower() == "auto":
        return 0
    try:
        n = int(raw)
    except ValueError:
        return False
    return n if n >= 0 else False
