"""Tokenizers: built-in bytes, a byte-level BPE trained on the corpus, or any tokenizer.json.

Specs (`--tokenizer` / `load_tokenizer`):
- `bytes`: ids 0-255 are the UTF-8 bytes, 256 is EOS; needs no files.
- `bpe:N`: a byte-level BPE of N ids trained by prep on the corpus and saved as
  `tokenizer.json` in the data folder; loading it needs that folder.
- a path to a `tokenizer.json` or a folder holding one, or a Hugging Face hub name such as
  `EleutherAI/gpt-neox-20b` (MPT's tokenizer; fetched from the hub cache or network only
  when asked for by name).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mptlike.errors import MptlikeError
from mptlike.files import atomic_write

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
BPE_EOS = "<|endoftext|>"
BPE_MIN_VOCAB = 257  # 256 byte symbols + EOS
# End-of-text names tried, in order, when a tokenizer.json comes without a config naming one.
_EOS_CANDIDATES = (BPE_EOS, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids; no vocabulary to train or ship."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogatepass"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", "surrogatepass"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` (what every Hugging Face fast tokenizer is underneath)."""

    def __init__(self, tok, name: str, eos_id: int) -> None:
        self.tok = tok
        self.name = name
        self.eos_id = eos_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs on all cores inside the Rust library.
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: Path) -> None:
        atomic_write(path, self.tok.to_str())


def parse_bpe_spec(spec: str) -> int | None:
    """The vocabulary size of a `bpe:N` spec, or None when the spec is not one."""
    if not spec.startswith("bpe:"):
        return None
    raw = spec[4:]
    if not raw.isdigit() or int(raw) < BPE_MIN_VOCAB:
        raise MptlikeError(
            f"Tokenizer spec {spec!r} needs an integer vocabulary size of at least "
            f"{BPE_MIN_VOCAB}; use e.g. bpe:8192."
        )
    return int(raw)


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) with `<|endoftext|>` as EOS."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        # Every byte is a symbol from the start, so no text can ever be out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The Rust trainer does not return to Python for minutes on a large corpus, so Ctrl-C would wait
    # for it: train in a daemon thread and wait here, where a KeyboardInterrupt ends the wait at once.
    failure: list[BaseException] = []

    def work() -> None:
        try:
            tok.train_from_iterator(texts, trainer)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=work, name="bpe-training", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if failure:
        raise failure[0]
    built = tok.get_vocab_size()
    if built < vocab_size:
        log.warning("bpe:%d: the corpus yields only %d ids (BPE stops when no pair of symbols repeats); the "
                    "manifest records vocab_size %d", vocab_size, built, built)
    return HFTokenizer(tok, f"bpe:{vocab_size}", tok.token_to_id(BPE_EOS))


def _eos_from_config(folder: Path) -> str | None:
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        eos = json.loads(cfg.read_text(encoding="utf-8")).get("eos_token")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _wrap(tok, name: str, where: str, eos_token: str | None) -> HFTokenizer:
    names = ([eos_token] if eos_token else []) + list(_EOS_CANDIDATES)
    for candidate in names:
        eos_id = tok.token_to_id(candidate)
        if eos_id is not None:
            return HFTokenizer(tok, name, eos_id)
    raise MptlikeError(
        f"Tokenizer {where} has no end-of-text token (tried {names}); add one as a special "
        "token or name it as eos_token in a tokenizer_config.json next to tokenizer.json."
    )


def _from_file(path: Path, name: str, eos_id: int | None = None) -> HFTokenizer:
    from tokenizers import Tokenizer as _Tok

    try:
        tok = _Tok.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for malformed files
        raise MptlikeError(
            f"Tokenizer file {path} could not be read ({e}); point to a valid tokenizer.json."
        ) from None
    if eos_id is not None:
        return HFTokenizer(tok, name, eos_id)
    return _wrap(tok, name, str(path), _eos_from_config(path.parent))


def load_tokenizer(spec: str, data_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Build the tokenizer named by `spec`; `data_dir` is where prep saved a trained one."""
    if spec == "bytes":
        return ByteTokenizer()
    saved = Path(data_dir) / TOKENIZER_FILE if data_dir is not None else None
    if parse_bpe_spec(spec) is not None:
        if saved is None or not saved.is_file():
            raise MptlikeError(
                f"Tokenizer {spec!r} is trained by mptlike-prep and saved in the data folder, "
                f"but {saved or 'no data folder'} holds none; run mptlike-prep --tokenizer "
                f"{spec} first."
            )
        return _from_file(saved, spec)
    if saved is not None and saved.is_file():
        # Prep keeps a copy next to the shards, so a prepared folder never needs the network;
        # its manifest remembers which id ended documents.
        eos_id = None
        if (saved.parent / "manifest.json").is_file():
            from mptlike.data.manifest import Manifest

            eos_id = Manifest.load(saved.parent).eos_id
        return _from_file(saved, spec, eos_id)
    local = Path(spec).expanduser()
    if local.is_dir():
        local = local / TOKENIZER_FILE
        if not local.is_file():
            raise MptlikeError(
                f"Tokenizer folder {local.parent} has no {TOKENIZER_FILE}; point --tokenizer at a "
                "folder or file holding a Hugging Face tokenizer.json."
            )
    if local.is_file():
        return _from_file(local, spec)
    if _looks_like_path(spec):
        raise MptlikeError(
            f"Tokenizer path {spec} does not exist; pass bytes, bpe:N, an existing tokenizer.json "
            "(or folder with one), or a Hugging Face hub name such as EleutherAI/gpt-neox-20b."
        )
    return _from_hub(spec)


def _looks_like_path(spec: str) -> bool:
    # Hub names are "name" or "org/name"; anything else that is missing is a mistyped path.
    return spec.startswith((".", "/", "~")) or spec.endswith(".json") or spec.count("/") > 1


def _from_hub(name: str) -> HFTokenizer:
    from tokenizers import Tokenizer as _Tok

    log.info("Loading tokenizer %s from the Hugging Face hub (or its local cache).", name)
    try:
        tok = _Tok.from_pretrained(name)
    except Exception as e:  # network, auth and not-found errors all surface as Exception
        raise MptlikeError(
            f"Tokenizer {name!r} is not a local file or folder and could not be loaded from the "
            f"Hugging Face hub ({type(e).__name__}); check the name, or pass bytes, bpe:N or a "
            "path to a tokenizer.json."
        ) from None
    return _wrap(tok, name, name, None)
