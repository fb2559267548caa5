"""Finding input files and reading documents out of them.

One `.txt` file (or any file named explicitly with another suffix) is one document; a `.jsonl`
file holds one document per line in a text field; a `.parquet` file one per row of a text
column. Folders are searched recursively, in sorted order, for `.txt`, `.jsonl` and `.parquet`.
Bytes that are not valid UTF-8 become U+FFFD rather than failing the run.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mptlike.errors import MptlikeError

FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_PARQUET_BATCH_ROWS = 1024


@dataclass
class Document:
    text: str
    nbytes: int  # input bytes this document accounts for, for the throughput display


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by the inputs, folders expanded recursively; errors for missing or empty ones."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(
                (f for f in p.rglob("*") if f.is_file() and f.suffix in FOLDER_SUFFIXES
                 and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                key=lambda f: f.relative_to(p).as_posix(),
            )
            if not found:
                raise MptlikeError(
                    f"Input folder {p} holds no {', '.join(FOLDER_SUFFIXES)} files; point "
                    "mptlike-prep at a folder or files with text in them."
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise MptlikeError(f"Input {p} does not exist; check the path given to mptlike-prep.")
    return files


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every .py file of this Python's standard library (installed packages excluded), sorted."""
    root = stdlib_root()
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files.extend(Path(folder) / n for n in sorted(names) if n.endswith(".py"))
    if not files:
        raise MptlikeError(
            f"The standard library folder {root} holds no .py files (a stripped Python?); pass "
            "your own text to mptlike-prep instead of --default-corpus."
        )
    return files


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _clean(text: str) -> str:
    # JSON may escape lone surrogates (\ud800), which no UTF-8 tokenizer accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def _line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line starting at byte `offset` (only for error messages)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 20))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count + 1


def _jsonl(path: Path, field: str, start: int = 0, end: int | None = None) -> Iterator[Document]:
    """The documents on the lines that start at a byte offset in [start, end)."""
    with open(path, "rb") as f:
        if start > 0:
            # The line holding byte start-1 started before `start`: the previous range reads it.
            f.seek(start - 1)
            f.readline()
        pos = f.tell()
        while end is None or pos < end:
            line = f.readline()
            if not line:
                break
            line_start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(_decode(line))
            except json.JSONDecodeError as e:
                raise MptlikeError(
                    f"{path} line {_line_number(path, line_start)} is not valid JSON ({e.msg}); fix or "
                    "remove that line."
                ) from None
            if not isinstance(row, dict) or field not in row:
                raise MptlikeError(
                    f"{path} line {_line_number(path, line_start)} has no field {field!r}; pass the name "
                    "of the text field with --text-field."
                )
            text = row[field]
            if not isinstance(text, str):
                raise MptlikeError(
                    f"{path} line {_line_number(path, line_start)} field {field!r} is "
                    f"{type(text).__name__}, not a string; pass the name of the text field with --text-field."
                )
            if b"\\ud" in line or b"\\uD" in line:
                text = _clean(text)
            yield Document(text, len(line))


def open_parquet(path: Path):
    """A `pyarrow.parquet.ParquetFile`, or the error naming the file."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise MptlikeError(
            f"{path} is not a readable parquet file ({e}); check or remove the file."
        ) from None


def _parquet(path: Path, field: str, row_groups: Sequence[int] | None = None) -> Iterator[Document]:
    pf = open_parquet(path)
    if field not in pf.schema_arrow.names:
        raise MptlikeError(
            f"{path} has no column {field!r} (columns: {pf.schema_arrow.names}); pass the name of "
            "the text column with --text-field."
        )
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field], row_groups=row_groups):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if isinstance(text, bytes):
                text = _decode(text)
            if not isinstance(text, str):
                raise MptlikeError(
                    f"{path} column {field!r} holds {type(text).__name__} values, not text; pass "
                    "the name of the text column with --text-field."
                )
            yield Document(text, len(text))


def read_documents(
    path: Path,
    text_field: str = "text",
    *,
    start: int = 0,
    end: int | None = None,
    row_groups: Sequence[int] | None = None,
) -> Iterator[Document]:
    """The documents of one input file, empty ones skipped.

    Parts of a file, for prep's work units: `start`/`end` pick the `.jsonl` lines that begin in that
    byte range, `row_groups` the row groups of a `.parquet` file; other files are one document.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = _jsonl(path, text_field, start, end)
    elif suffix == ".parquet":
        docs = _parquet(path, text_field, row_groups)
    else:
        data = path.read_bytes()
        docs = iter([Document(_decode(data), len(data))])
    for doc in docs:
        if doc.text:
            yield doc
