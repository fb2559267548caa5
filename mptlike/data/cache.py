"""The local shard cache: remote shards fetched on demand, verified, shared by a node's ranks, size-bounded.

Layout under the cache folder (data.cache_dir; $MPTLIKE_CACHE or ~/.cache/mptlike by default):

    shards/<sha256>.bin    a shard, named by its content: downloaded under a temporary name of its own
                           (.<sha256>.<bytes>.<pid>-<thread>.tmp, created while the room for it is
                           made, so that downloads in flight count against the bound), checked against
                           the manifest's sha256, then renamed into place: a reader never sees half a
                           file. Its mtime is its last use: eviction takes the least recently used first.
    shards/<sha256>.lock   flock(2): shared while a reader or the prefetcher holds the shard ("pinned"),
                           exclusive while it is evicted (never waited for: a pinned shard is skipped)
    shards/<sha256>.download  flock(2), exclusive: one download of the shard at a time, over all processes.
                           Lock files are never deleted, so two processes always lock the same file.
    shards/.evict.lock     one eviction at a time
    folders/               the local views of remote folders (mptlike.data.remote)

A rank that needs a shard takes its lock shared; if the file is there it is used at once. Otherwise
the rank takes the download lock, and only the first to get it downloads (the others then find the
file and pin it): the ranks of a node never download a shard twice. Before a download, least
recently used shards are evicted until the new one fits under data.cache_max_gb; a pinned shard is
never evicted (its lock cannot be taken exclusively). A reading process pins the shards it keeps
mapped (a quarter of the bound's worth, 4 to 256) and the prefetcher data.prefetch_shards more; when
the bound cannot hold what all processes pin, the cache grows past it and says so once. Deleting
the cache folder while a run reads it is safe: mapped shards stay readable, the rest are downloaded
again.

The prefetcher is a thread beside the loader that walks the sample order ahead of it and pins the
next data.prefetch_shards shards it will read, downloading those not cached, so that in a steady
state no step waits on the network; a pin is released once the loader has passed the batch it was
taken for.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mptlike.data.manifest import MANIFEST_NAME, Manifest
from mptlike.data.remote import (
    REMOTE_FILE,
    RemoteSettings,
    denied_error,
    file_lock,
    filesystem,
    write_view,
)
from mptlike.errors import MptlikeError

log = logging.getLogger(__name__)

SHARDS = "shards"
_CHUNK = 8 << 20  # bytes per ranged GET
_STALE_TMP_S = 3600.0  # a temporary file untouched this long belongs to a download that died
# Shards a reader keeps mapped (and pinned) between batches: as many as a quarter of its share of the cache
# bound holds (the bound split over the node's LOCAL_WORLD_SIZE ranks),
# at least 4 and at most 256. A sample in a shard already mapped costs a slice, one in another shard a lock,
# a stat and a fresh memory map, which across a shuffled dataset would be most samples.
_READER_MIN, _READER_MAX = 4, 256
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


@dataclass(frozen=True)
class RemoteShard:
    url: str
    sha256: str
    size: int  # bytes
    folder: str  # the remote folder's URL, for the fix in error lines


class Pin:
    """A shared lock on a cached shard: while held, no process evicts it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path, self.pid = fd, path, os.getpid()

    def release(self) -> None:
        if self.fd < 0:
            return
        if os.getpid() == self.pid:
            try:
                os.utime(self.path)  # its last use, for eviction
            except FileNotFoundError:
                pass  # the cache folder was deleted: nothing to keep
        # A forked child (a DataLoader worker) closes its inherited copy too: flock holds while any descriptor
        # of the open file stays open, so the parent's lock stays, and the child no longer keeps it alive.
        os.close(self.fd)
        self.fd = -1


class ShardCache:
    """The shards folder of one cache: `acquire` returns a pinned, verified local copy of a remote shard."""

    def __init__(self, settings: RemoteSettings) -> None:
        self.settings = settings
        self.dir = settings.root / SHARDS
        self.retry = settings.retry()
        self._fs = None
        self._fs_pid = -1
        self._fs_lock = threading.Lock()
        self._warned = False

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fs=None, _fs_pid=-1, _fs_lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fs_lock = threading.Lock()

    def fs(self, url: str):
        with self._fs_lock:
            if self._fs is None or self._fs_pid != os.getpid():  # a forked worker builds its own
                self._fs, self._fs_pid = filesystem(url, self.settings), os.getpid()
            return self._fs

    def path(self, shard: RemoteShard) -> Path:
        return self.dir / f"{shard.sha256}.bin"

    def touch(self, shard: RemoteShard) -> None:
        """Mark a cached shard as just used (eviction takes the least recently used first)."""
        try:
            os.utime(self.path(shard))
        except FileNotFoundError:
            pass

    def is_cached(self, shard: RemoteShard) -> bool:
        try:
            return self.path(shard).stat().st_size == shard.size
        except FileNotFoundError:
            return False

    def acquire(self, shard: RemoteShard, on_download: Callable[[], None] | None = None) -> Pin:
        """Pin the shard's local copy, downloading it first unless this or another process has it."""
        final = self.path(shard)
        while True:
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.dir / f"{shard.sha256}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the cache folder was deleted under us
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self.is_cached(shard):
                    os.utime(final)  # its last use, for eviction
                    return Pin(fd, final)
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            # Not pinned while it downloads: a pin waiting for a download would block a reader that waits for the
            # pinner. One download per shard at a time, over every process; the others wait, then find it.
            try:
                with file_lock(self.dir / f"{shard.sha256}.download"):
                    if not self.is_cached(shard):
                        if on_download is not None:
                            on_download()
                        self._download(shard, final)
            except FileNotFoundError:
                pass  # the cache folder was deleted under us (remote errors arrive as MptlikeError): again

    # --- download ---------------------------------------------------------------------------
    def _download(self, shard: RemoteShard, final: Path) -> None:
        fs = self.fs(shard.url)
        try:
            size = self.retry.call(lambda: fs.size(shard.url), shard.url)
        except FileNotFoundError:
            raise MptlikeError(f"Shard {shard.url} listed in the manifest is missing from the bucket; re-run "
                               f"`mptlike-prep INPUT... --out {shard.folder}`") from None
        except PermissionError as exc:
            raise denied_error(shard.url, exc) from None
        if size != shard.size:
            raise MptlikeError(f"Shard {shard.url} is {size} bytes but the manifest expects {shard.size}: it was "
                               f"changed or damaged in the bucket; re-run `mptlike-prep INPUT... --out {shard.folder}` "
                               "(nothing of it was cached)")
        tmp = self._reserve(shard)
        try:
            # A mismatch may come from the transfer: one more download before the object is blamed.
            for attempt in (1, 2):
                try:
                    if self._fetch(fs, shard, tmp) == shard.sha256:
                        os.replace(tmp, final)
                        return
                except OSError as exc:
                    if exc.errno not in _NO_ROOM:
                        raise
                    raise MptlikeError(
                        f"the shard cache {self.dir} ran out of room while downloading {shard.url} "
                        f"({os.strerror(exc.errno)}): free space there, set data.cache_max_gb below the free space, "
                        f"or point data.cache_dir at a larger local disk (nothing half-written was kept)") from None
                log.warning("%s does not match its sha256 in the manifest (download %d of 2)", shard.url, attempt)
            raise MptlikeError(f"Shard {shard.url} does not match its sha256 in the manifest after 2 downloads: it "
                               f"was changed or damaged in the bucket; re-run `mptlike-prep INPUT... --out "
                               f"{shard.folder}` (nothing of it was cached)")
        finally:
            tmp.unlink(missing_ok=True)

    def _fetch(self, fs, shard: RemoteShard, tmp: Path) -> str:
        """Download into `tmp` in ranged reads; a retry continues from the last byte written. Returns the sha256."""
        digest = hashlib.sha256()
        with open(tmp, "wb") as f:
            done = 0

            def rest() -> None:
                nonlocal done
                while done < shard.size:
                    data = fs.cat_file(shard.url, start=done, end=min(done + _CHUNK, shard.size))
                    if not data:
                        raise EOFError(shard.url)
                    f.write(data)
                    digest.update(data)
                    done += len(data)

            try:
                self.retry.call(rest, shard.url)
            except EOFError:
                return ""  # shorter than its size said: a mismatch
            except FileNotFoundError:
                raise MptlikeError(f"Shard {shard.url} listed in the manifest is missing from the bucket; re-run "
                                   f"`mptlike-prep INPUT... --out {shard.folder}`") from None
            except PermissionError as exc:
                raise denied_error(shard.url, exc) from None
            f.flush()
            os.fsync(f.fileno())
        return digest.hexdigest()

    # --- eviction ---------------------------------------------------------------------------
    def _reserve(self, shard: RemoteShard) -> Path:
        """Make room for the shard (evicting least recently used, unpinned shards) and create its temporary file.

        Both under the eviction lock, so that every process's downloads in flight count against the bound.
        """
        tmp = self.dir / f".{shard.sha256}.{shard.size}.{os.getpid()}-{threading.get_ident()}.tmp"
        limit = self.settings.max_bytes
        if limit is None:
            tmp.touch()
            return tmp
        lock = os.open(self.dir / ".evict.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._make_room(shard.size, limit)
            tmp.touch()
            return tmp
        finally:
            os.close(lock)

    def _make_room(self, incoming: int, limit: int) -> None:
        now = time.time()
        entries, reserved = [], 0
        for e in os.scandir(self.dir):
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            if e.name.endswith(".bin"):
                entries.append((st.st_mtime_ns, st.st_size, e.name))
            elif e.name.endswith(".tmp"):
                if now - st.st_mtime > _STALE_TMP_S:
                    Path(e.path).unlink(missing_ok=True)  # left by a download that died
                else:
                    reserved += int(e.name.split(".")[2])
        total = sum(size for _, size, _ in entries) + reserved
        for _, size, name in sorted(entries):
            if total + incoming <= limit:
                break
            if self._evict(name):
                total -= size
        if total + incoming > limit and not self._warned:
            self._warned = True
            log.warning("the shard cache %s needs %.2f GB for the shards in use, more than data.cache_max_gb=%g: "
                        "raise it (each reading process pins data.prefetch_shards shards, plus those it keeps "
                        "mapped: a quarter of the bound, at least %d)",
                        self.dir, (total + incoming) / 1e9, self.settings.cache_max_gb, _READER_MIN)

    def _evict(self, name: str) -> bool:
        fd = os.open(self.dir / (name[: -len(".bin")] + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # pinned by a reader
        try:
            (self.dir / name).unlink(missing_ok=True)
            log.debug("evicted %s from the shard cache", name)
            return True
        finally:
            os.close(fd)


class RemoteShards:
    """A split's shards as TokenDataset reads them: `reader[k]` is shard k, mapped from the cache.

    The `keep_open` shards read last stay mapped and pinned; older ones are unmapped and unpinned.
    """

    def __init__(self, view: Path, url: str, settings: RemoteSettings, manifest: Manifest, split: str) -> None:
        self.view, self.url = view, url
        self.cache = ShardCache(settings)
        self.dtype = np.dtype(manifest.dtype).newbyteorder("<")
        self.shards = [RemoteShard(f"{url}/{s.name}", s.sha256, s.num_tokens * self.dtype.itemsize, url)
                       for s in manifest.shards[split]]
        # The view's small files, to write again if the cache folder is deleted under a running job.
        self._view_files = {p.name: p.read_bytes() for p in view.iterdir() if p.is_file()}
        self._open: OrderedDict[int, tuple[Pin, np.ndarray]] = OrderedDict()
        self._pid = os.getpid()
        self._view_checked = time.monotonic()
        largest = max([s.size for s in self.shards] or [1]) or 1
        # The node's readers (one per local rank) share the bound: each keeps at most a quarter of its share.
        readers = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        share = (settings.max_bytes or 1 << 62) // (4 * largest * readers)
        self.keep_open = max(_READER_MIN, min(_READER_MAX, share))

    @property
    def prefetch_depth(self) -> int:
        return self.cache.settings.prefetch_shards

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # maps and locks belong to this process
        return state

    def _restore_view(self) -> None:
        """Write the view again if the cache folder was deleted: the run's export reads its manifest and tokenizer."""
        self._view_checked = time.monotonic()
        if not (self.view / MANIFEST_NAME).is_file() or not (self.view / REMOTE_FILE).is_file():
            write_view(self.view, self._view_files)

    def __getitem__(self, k: int) -> np.ndarray:
        if self._pid != os.getpid():  # a forked DataLoader worker: its parent's locks are not its own
            for pin, _ in self._open.values():
                pin.release()
            self._open.clear()
            self._pid = os.getpid()
        if time.monotonic() - self._view_checked > 1.0:
            self._restore_view()
        hit = self._open.get(k)
        if hit is not None:
            self._open.move_to_end(k)
            return hit[1]
        shard = self.shards[k]
        if shard.size == 0:
            return np.empty(0, self.dtype)  # np.memmap refuses empty files
        while len(self._open) >= self.keep_open:  # before the next pin: never more than keep_open at once
            _, (old, _) = self._open.popitem(last=False)
            old.release()
        while True:
            pin = self.cache.acquire(shard, on_download=self._restore_view)
            try:
                array = np.memmap(pin.path, dtype=self.dtype, mode="r")
                break
            except FileNotFoundError:  # the cache folder was deleted in between
                pin.release()
        self._open[k] = (pin, array)
        return array

    def shards_of(self, starts: np.ndarray, offsets: np.ndarray, span: int) -> list[int]:
        """Indices of the shards that stream windows [start, start + span) read, in first-need order."""
        first = np.searchsorted(offsets, starts, side="right") - 1
        last = np.searchsorted(offsets, starts + span - 1, side="right") - 1
        needed: dict[int, None] = {}
        for a, b in zip(first.tolist(), last.tolist()):
            for k in range(a, b + 1):
                if self.shards[k].size:
                    needed[k] = None
        return list(needed)


# --------------------------------------------------------------------------------------- prefetch


class Prefetcher:
    """A thread that downloads and pins, in the order the loader will read them, the next `depth` shards
    that are not in the cache; those already there it marks as just used, so that eviction takes them last.

    `needs(indices)` gives the (cache, shard) pairs a micro-batch of sample indices reads; `batches`
    is the loader's own sequence of micro-batches, from where it starts. `advance(n)` tells the thread
    that the loader has read n micro-batches: the pins taken for them are released. Cached shards are
    not pinned: in a steady state with everything cached the thread costs a stat per shard now and then.
    """

    # Micro-batches the walk may run ahead of the loader; once there it sleeps until the loader is half that
    # behind, so that a steady state wakes it once per HORIZON / 2 batches, not per batch.
    HORIZON = 64

    def __init__(self, needs: Callable[[list[int]], Sequence[tuple[ShardCache, RemoteShard]]],
                 batches: Iterator[list[int]], depth: int) -> None:
        self.needs, self.batches, self.depth = needs, batches, depth
        self.pins: dict[str, tuple[Pin, int]] = {}  # sha256 -> (pin, micro-batch it was taken for)
        self.consumed = 0
        self.wake_at: int | None = None  # the `consumed` the walk sleeps for, when it is HORIZON ahead
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="mptlike-shard-prefetch", daemon=True)
        self.thread.start()

    def _wait(self, ready: Callable[[], bool]) -> bool:
        """Block until `ready()` (checked under the lock) or close(); False when closed."""
        with self.cond:
            while not self.closed and not ready():
                self.cond.wait()
            return not self.closed

    def _run(self) -> None:
        touched: dict[str, int] = {}  # sha256 -> the micro-batch it was last pinned or touched for
        try:
            for j, indices in enumerate(self.batches):
                if j >= self.consumed + self.HORIZON:
                    with self.cond:
                        self.wake_at = j - self.HORIZON // 2
                    if not self._wait(lambda: self.consumed >= self.wake_at):
                        return
                    with self.cond:
                        self.wake_at = None
                for cache, shard in self.needs(indices):
                    if shard.sha256 in touched and touched[shard.sha256] > j - self.HORIZON:
                        continue
                    if cache.is_cached(shard):
                        cache.touch(shard)
                        touched[shard.sha256] = j
                        continue
                    if not self._wait(lambda s=shard: s.sha256 in self.pins or len(self.pins) < self.depth):
                        return
                    with self.cond:
                        if shard.sha256 in self.pins:
                            continue
                    pin = cache.acquire(shard)
                    touched[shard.sha256] = j
                    with self.cond:
                        if self.closed or j < self.consumed:  # the loader got there first
                            pin.release()
                        else:
                            self.pins[shard.sha256] = (pin, j)
        except MptlikeError as exc:
            log.warning("shard prefetch stopped: %s (the loader fetches on demand)", exc)
        except Exception:
            log.exception("shard prefetch stopped (the loader fetches on demand)")

    def advance(self, consumed: int) -> None:
        with self.cond:
            self.consumed = consumed
            done = [k for k, (_, j) in self.pins.items() if j < consumed]
            for key in done:
                self.pins.pop(key)[0].release()
            if done or (self.wake_at is not None and consumed >= self.wake_at):
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=5.0)
        with self.cond:
            for pin, _ in self.pins.values():
                pin.release()
            self.pins.clear()


def start_prefetch(dataset: object, batches: Iterator[list[int]]) -> Prefetcher | None:
    """A Prefetcher for a dataset that reads remote shards (`remote_shards`, `prefetch_depth`), else None."""
    depth = getattr(dataset, "prefetch_depth", 0)
    if not depth:
        return None
    return Prefetcher(dataset.remote_shards, batches, depth)
