"""Writing files and folders so that a reader sees the old version or the new one, never a torn one.

The run folder's files (config, metrics, events, checkpoint metadata, final/) and the data folder's
manifest and tokenizer go through these two functions: the content is written under a hidden
temporary name in the same folder (so the rename cannot cross file systems), flushed to disk, then
renamed over the target in one step. Two writers keep their own: the model's save_pretrained (the
model layer imports nothing but torch) and mptlike-convert's output folder (a random staging name,
so a user's own `OUT.old` is never touched).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def temp_name(path: Path) -> Path:
    """The hidden sibling a file is staged in: `.name.tmp`."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int = 0o666) -> Path:
    """Write `data` to `path` atomically (text as UTF-8); returns the path. `mode` (less the umask) holds from
    the first byte, e.g. 0o600 for a file that may carry credentials."""
    path = Path(path)
    tmp = temp_name(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a signal leaves no half-written sibling
        raise
    return path


def replace_dir(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a fully written folder `staged` to `final`, replacing an existing `final` whole.

    A crash between the two renames leaves `final.old` (the previous version, intact) and no `final`;
    readers that look for `final` find nothing half-written either way.
    """
    staged, final = Path(staged), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    return final
