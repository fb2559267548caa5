"""Prepared data folders in object storage (s3://, gs://, any fsspec URL): opened, retried, uploaded.

A remote data folder is what `mptlike-prep --out URL` uploads: the shards, tokenizer.json when the
tokenizer was trained, and manifest.json, written last, so a reader never sees a manifest that names
a shard not uploaded yet. Training reads it through a *local view*: `open_remote(url)` copies
manifest.json (and tokenizer.json) into `<cache_dir>/folders/<name>-<key>/` next to `remote.json`,
which says where the shards are and how to fetch them. Whatever reads a data folder's manifest or
tokenizer reads the view unchanged; `TokenDataset` reads the shards through the shard cache
(mptlike.data.cache), which fetches them on demand and checks each against the manifest's sha256.

One retry policy covers every request: a transient failure (a connection refused, reset or dropped
mid-body, a timeout, an HTTP 5xx) is tried again, `retries` attempts in all, after waits that start
at `backoff_s` and double (at most 30 s, jittered so that the ranks of a job do not retry in step);
any other failure ends at once. For s3:// the client's own retry layers (s3fs's and botocore's) are
switched off so that this policy is the only one and `data.remote_retries` means what it says.
Failures that no retry fixes (no bucket, no manifest, access denied, a missing package) are one
MptlikeError line naming the URL and the fix.

fsspec and its protocol packages (s3fs, gcsfs) are imported only when a URL is opened: a run on a
local folder never loads them.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import http.client
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mptlike.data.manifest import MANIFEST_NAME, Manifest
from mptlike.errors import MptlikeError, short_error
from mptlike.files import atomic_write

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_ENV = "MPTLIKE_CACHE"
REMOTE_FILE = "remote.json"  # in a view: the URL and the settings its shards are read with
FOLDERS = "folders"
STAGING = "staging"
MAX_BACKOFF_S = 30.0
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_S3 = ("s3", "s3a")
_PREP_HINT = "`mptlike-prep INPUT... --out {url} --tokenizer bytes`"

# Exceptions that mean "the connection or the server failed, not the request": botocore's and
# aiohttp's connection errors, fsspec's timeout, a body cut short. Matched by name along the MRO,
# so that none of those packages has to be imported to classify an error.
_TRANSIENT_TYPES = frozenset({
    "HTTPClientError", "ConnectionClosedError", "EndpointConnectionError", "ConnectTimeoutError",
    "ReadTimeoutError", "IncompleteReadError", "ResponseStreamingError", "ProxyConnectionError",
    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ClientOSError",
    "ServerTimeoutError", "FSTimeoutError", "ProtocolError",
})
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "500", "502",
                              "503", "504"})
_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
                               errno.ETIMEDOUT, getattr(errno, "EREMOTEIO", errno.EIO), errno.EBUSY})


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL of a remote file system (file:// and plain paths are local)."""
    text = str(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def local_path(path: str | os.PathLike) -> Path:
    """A plain path for a local path or a file:// URL."""
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def default_cache_dir() -> Path:
    """$MPTLIKE_CACHE, else ~/.cache/mptlike."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mptlike").expanduser()


# File systems one folder of which several nodes see. The cache's flock pins are per process there at best
# (NFS emulates flock with POSIX record locks) or refused (Lustre without -o flock), and another node could
# evict a shard this node has mapped: the cache must be node-local.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "glusterfs",
                       "fuse.glusterfs", "fuse.sshfs", "9p", "pvfs2", "orangefs", "wekafs")


def _mountinfo() -> str:
    """/proc/self/mountinfo's text ('' where there is none): the one place the mounts are read."""
    try:
        return Path("/proc/self/mountinfo").read_text()
    except OSError:
        return ""


def filesystem_type(path: Path, mountinfo: str) -> str | None:
    """The type of the file system `path` (absolute, resolved) lies on: that of the longest mount point above it."""
    best, kind = "", None
    target = str(path)
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail.split():
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])  # "\040" is a space
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, tail.split()[0]
    return kind


def cache_root(cache_dir: str | None) -> Path:
    """The cache folder for data.cache_dir (None: the default), checked to be node-local.

    A default on a shared file system (a home folder over NFS, the usual case on clusters) moves to the
    node-local $TMPDIR (else /tmp) with a warning; a folder the user chose there is refused with one line.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return _node_local(root, bool(cache_dir or os.environ.get(CACHE_ENV)))


@functools.cache
def _node_local(root: Path, chosen: bool) -> Path:
    existing = root.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    kind = filesystem_type(existing.resolve(), _mountinfo())
    if kind not in NETWORK_FILESYSTEMS:
        return root
    if chosen:
        raise MptlikeError(f"the shard cache {root} (data.cache_dir or ${CACHE_ENV}) is on a {kind} file system "
                           f"that several nodes share, where its file locks do not hold: point data.cache_dir at a "
                           f"node-local disk (e.g. /tmp, $TMPDIR or a local NVMe)")
    local = Path(os.environ.get("TMPDIR") or "/tmp") / f"mptlike-cache-{os.getuid()}"
    log.warning("the default shard cache %s is on a %s file system that several nodes share; using the node-local "
                "%s instead (data.cache_dir chooses another)", root, kind, local)
    return local


@dataclass(frozen=True)
class RemoteSettings:
    """How remote shards are fetched and cached; the data.* keys of the same names (see the schema)."""

    cache_dir: str | None = None  # None: $MPTLIKE_CACHE, else ~/.cache/mptlike
    cache_max_gb: float = 50.0  # 0: no bound
    prefetch_shards: int = 4
    retries: int = 5  # attempts per request, the first included
    backoff_s: float = 1.0
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            ("data.cache_max_gb", self.cache_max_gb, self.cache_max_gb >= 0, "use a size in GB, or 0 for no bound"),
            ("data.prefetch_shards", self.prefetch_shards, self.prefetch_shards >= 0,
             "use a number of shards to fetch ahead, or 0 to fetch only on demand"),
            ("data.remote_retries", self.retries, self.retries >= 1, "use a number of attempts, at least 1"),
            ("data.remote_backoff_s", self.backoff_s, self.backoff_s >= 0, "use a wait in seconds, e.g. 1"),
        ]
        for key, value, ok, fix in checks:
            if not ok:
                raise MptlikeError(f"{key}={value} is invalid: {fix}")

    @classmethod
    def from_config(cls, data: Any) -> RemoteSettings:
        """From the training config's `data` section: a DataConfig, or its dict as config.yaml holds it."""
        get = data.get if isinstance(data, Mapping) else lambda key: getattr(data, key)
        return cls(cache_dir=get("cache_dir"), cache_max_gb=float(get("cache_max_gb")),
                   prefetch_shards=int(get("prefetch_shards")), retries=int(get("remote_retries")),
                   backoff_s=float(get("remote_backoff_s")), storage_options=dict(get("storage_options") or {}))

    @property
    def root(self) -> Path:
        return cache_root(self.cache_dir)

    @property
    def max_bytes(self) -> int | None:
        return int(self.cache_max_gb * 1e9) if self.cache_max_gb > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["storage_options"] = dict(self.storage_options)
        return d

    def retry(self) -> Retry:
        return Retry(self.retries, self.backoff_s)


# ---------------------------------------------------------------------------------------- retries


def _http_status(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) of a botocore ClientError or an aiohttp response error, if it is one."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return status, (response.get("Error") or {}).get("Code")
    status = getattr(exc, "status", None)
    return (status, None) if isinstance(status, int) else (None, None)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying could help: the connection or the server failed, not the request itself."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, PermissionError, MptlikeError, ImportError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError, http.client.IncompleteRead)):
            return True
        if any(t.__name__ in _TRANSIENT_TYPES for t in type(e).__mro__):
            return True
        status, code = _http_status(e)
        if (status is not None and status >= 500) or code in _TRANSIENT_CODES:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoRegionError"}


def _is_missing_credentials(exc: BaseException) -> bool:
    return any(t.__name__ in _CREDENTIAL_ERRORS for t in type(exc).__mro__)


_RETRY_FIX = "check the network and the endpoint (data.storage_options, AWS_ENDPOINT_URL), or raise data.remote_retries"
_UPLOAD_FIX = ("check the network and the endpoint (AWS_ENDPOINT_URL), then run the same command again: the upload "
               "resumes where it stopped, and the manifest is written only once every shard is there")


class RetriesExhausted(MptlikeError):
    """Every attempt failed with a transient error."""


class Retry:
    """`call(op)` runs op, again after a transient failure: `attempts` tries in all, exponential backoff."""

    def __init__(self, attempts: int, backoff_s: float, max_backoff_s: float = MAX_BACKOFF_S) -> None:
        self.attempts, self.backoff_s, self.max_backoff_s = attempts, backoff_s, max_backoff_s
        self._rng = random.Random()

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure: backoff_s * 2^(failures-1), capped, in [half, all] of it."""
        full = min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))
        return full * (0.5 + 0.5 * self._rng.random())

    def call(self, op: Callable[[], T], url: str, *, doing: str = "read", fix: str = _RETRY_FIX) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return op()
            except Exception as exc:
                if _is_missing_credentials(exc):  # botocore's, which s3fs passes on untranslated
                    raise denied_error(url, exc) from None
                if not is_transient(exc):
                    raise
                if attempt == self.attempts:
                    raise RetriesExhausted(
                        f"could not {doing} {url}: {self.attempts} attempts failed, the last with "
                        f"{type(exc).__name__}: {short_error(exc)}; {fix}"
                    ) from None
                wait = self.delay(attempt)
                log.warning("%s %s failed (%s: %s); retrying in %.1f s (attempt %d of %d)", doing, url,
                            type(exc).__name__, short_error(exc), wait, attempt + 1, self.attempts)
                time.sleep(wait)
        raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ file systems, errors


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower()


def filesystem(url: str, settings: RemoteSettings):
    """A fresh fsspec file system for `url` (fresh: a cached instance may carry another process's event loop)."""
    protocol = protocol_of(url)
    options = dict(settings.storage_options)
    if protocol in _S3:
        # botocore retries on its own (and s3fs around it); this module's Retry is the one policy.
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1})
        options["config_kwargs"] = config
    try:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    except ImportError as exc:
        extra = "pip install 'mptlike[s3]'" if protocol in _S3 else f"install fsspec's package for {protocol}://"
        raise MptlikeError(f"{url} needs a package that is not installed ({short_error(exc)}): {extra}") from None
    except (ValueError, TypeError) as exc:
        raise MptlikeError(f"{url} cannot be opened ({short_error(exc)}): use an fsspec URL such as s3://bucket/prefix "
                           "and storage options that protocol knows (data.storage_options)") from None
    if protocol in _S3 and hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop: one attempt, see above
    return fs


def denied_error(url: str, exc: BaseException) -> MptlikeError:
    creds = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE" if protocol_of(url) in _S3 else
             "the credentials of that storage")
    return MptlikeError(f"access to {url} was denied ({short_error(exc)}): give credentials that may read and write "
                        f"it ({creds}, or data.storage_options)")


def _bucket_url(url: str) -> str:
    return f"{protocol_of(url)}://{urlsplit(url).netloc}"


def _bucket_exists(fs, url: str, retry: Retry) -> bool:
    bucket = _bucket_url(url)
    try:
        return bool(retry.call(lambda: fs.exists(bucket), bucket))
    except PermissionError as exc:
        raise denied_error(bucket, exc) from None


def no_bucket_error(url: str) -> MptlikeError:
    return MptlikeError(f"bucket {_bucket_url(url)} does not exist (for {url}): check the URL and the endpoint "
                        "(data.storage_options.endpoint_url, AWS_ENDPOINT_URL), or create the bucket and prepare the "
                        f"data into it with {_PREP_HINT.format(url=url)}")


# ---------------------------------------------------------------------------------------- the view


def _slug(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1] or urlsplit(url).netloc
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:40] or "data"


def view_dir(url: str, settings: RemoteSettings) -> Path:
    """Where the local view of `url` lives: one per URL and settings."""
    key = hashlib.sha256(json.dumps([url, settings.to_dict()], sort_keys=True).encode()).hexdigest()[:16]
    return settings.root / FOLDERS / f"{_slug(url)}-{key}"


@contextmanager
def file_lock(path: Path, exclusive: bool = True) -> Iterator[None]:
    """An flock on `path` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def write_view(view: Path, files: Mapping[str, bytes]) -> None:
    """Write a view's files, the manifest last; under a lock, since every rank of a node opens the same view."""
    view.mkdir(parents=True, exist_ok=True)
    with file_lock(view.with_name(view.name + ".lock")):
        order = sorted(files, key=lambda name: name == MANIFEST_NAME)
        for name in order:
            path = view / name
            if not (path.is_file() and path.read_bytes() == files[name]):
                # remote.json may hold credentials given in data.storage_options: never readable by others.
                atomic_write(path, files[name], mode=0o600 if name == REMOTE_FILE else 0o666)


def read_view(view: Path) -> tuple[str, RemoteSettings] | None:
    """(URL, settings) of a view, or None for a local data folder."""
    path = view / REMOTE_FILE
    if not path.is_file():
        return None
    d = json.loads(path.read_text(encoding="utf-8"))
    return d["url"], RemoteSettings(**d["settings"])


def open_remote(url: str, settings: RemoteSettings | None = None, *, key: str = "data.path") -> Path:
    """Read the manifest (and tokenizer) of the remote folder `url` into its local view; returns the view.

    No shard is fetched here. `key` names the setting the URL came from, for the error lines.
    """
    settings = settings or RemoteSettings()
    url = url.rstrip("/")
    fs = filesystem(url, settings)
    retry = settings.retry()
    manifest_url = f"{url}/{MANIFEST_NAME}"
    try:
        raw = retry.call(lambda: fs.cat_file(manifest_url), manifest_url)
    except FileNotFoundError:
        if not _bucket_exists(fs, url, retry):
            raise no_bucket_error(url) from None
        raise MptlikeError(f"{key}={url} has no {MANIFEST_NAME} (preparation never finished there, or the prefix is "
                           f"wrong): run {_PREP_HINT.format(url=url)} to (re)build it") from None
    except PermissionError as exc:
        raise denied_error(manifest_url, exc) from None
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MptlikeError(f"{manifest_url} is not valid JSON ({exc}): re-run {_PREP_HINT.format(url=url)}") from None
    if not isinstance(d, dict):
        raise MptlikeError(f"{manifest_url} is not a JSON object: re-run {_PREP_HINT.format(url=url)}")
    manifest = Manifest.from_dict(d, where=manifest_url)  # validates
    files = {MANIFEST_NAME: raw,
             REMOTE_FILE: json.dumps({"url": url, "settings": settings.to_dict()}, indent=2).encode()}
    if manifest.tokenizer_file:
        tok_url = f"{url}/{manifest.tokenizer_file}"
        try:
            files[manifest.tokenizer_file] = retry.call(lambda: fs.cat_file(tok_url), tok_url)
        except FileNotFoundError:
            raise MptlikeError(f"{tok_url}, named by its manifest, is missing: re-run "
                               f"{_PREP_HINT.format(url=url)}") from None
        except PermissionError as exc:
            raise denied_error(tok_url, exc) from None
    view = view_dir(url, settings)
    write_view(view, files)
    return view


def run_view(url: str, data: Mapping[str, Any]) -> Path | None:
    """The local view of `url` for a finished run whose config's data section is `data` (its tokenizer, say):
    the view training used if the cache still has it, else one opened now; None if the bucket cannot be read."""
    try:
        view = view_dir(url.rstrip("/"), RemoteSettings.from_config(data))
        if (view / MANIFEST_NAME).is_file():
            return view
    except (TypeError, ValueError):  # an older run's config without these keys
        pass
    try:
        return open_remote(url, RemoteSettings(cache_dir=data.get("cache_dir")))
    except MptlikeError as exc:
        log.warning("the run's data at %s gives no tokenizer: %s", url, exc)
        return None


# ------------------------------------------------------------------------------------------ upload

UPLOADED = ".uploaded.json"  # in the staging folder: {name: sha256} of what reached the bucket
_SHARD_OBJECT = re.compile(r"^(train|val)_\d{5}\.bin$")


def staging_dir(url: str, settings: RemoteSettings) -> Path:
    """Where `mptlike-prep --out URL` prepares before it uploads (kept until the upload has finished)."""
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return settings.root / STAGING / f"{_slug(url)}-{key}"


def remote_manifest(url: str, settings: RemoteSettings) -> Manifest | None:
    """The manifest at `url`, or None when there is none (or it is unreadable: it will be replaced).

    Refuses a bucket that does not exist, before anything is prepared for it."""
    fs = filesystem(url, settings)
    manifest_url = f"{url.rstrip('/')}/{MANIFEST_NAME}"
    retry = settings.retry()
    try:
        raw = retry.call(lambda: fs.cat_file(manifest_url), manifest_url)
        return Manifest.from_dict(json.loads(raw), path=None)
    except FileNotFoundError:
        if not _bucket_exists(fs, url, retry):
            raise no_bucket_error(url) from None
        return None
    except PermissionError as exc:
        raise denied_error(manifest_url, exc) from None
    except (ValueError, MptlikeError) as exc:
        if isinstance(exc, RetriesExhausted):
            raise
        return None


def upload_folder(local: Path, url: str, manifest: Manifest, settings: RemoteSettings) -> None:
    """Upload a prepared folder's shards and tokenizer, then its manifest, last.

    The old manifest is deleted first, so between the two no reader takes the folder for prepared.
    What was uploaded is recorded in the staging folder, so an interrupted upload resumes where it
    stopped; shards of an older preparation that the new manifest does not name are deleted.
    """
    url = url.rstrip("/")
    fs = filesystem(url, settings)
    retry = settings.retry()
    if not _bucket_exists(fs, url, retry):
        raise no_bucket_error(url)
    record_path = local / UPLOADED
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    names = {s.name: s.sha256 for shards in manifest.shards.values() for s in shards}
    if manifest.tokenizer_file:
        names[manifest.tokenizer_file] = hashlib.sha256((local / manifest.tokenizer_file).read_bytes()).hexdigest()

    def call(op: Callable[[], T], target: str) -> T:
        try:
            return retry.call(op, target, doing="upload to", fix=_UPLOAD_FIX)
        except PermissionError as exc:
            raise denied_error(target, exc) from None
        except FileNotFoundError:
            raise no_bucket_error(url) from None

    manifest_url = f"{url}/{MANIFEST_NAME}"
    call(lambda: fs.rm_file(manifest_url) if fs.exists(manifest_url) else None, manifest_url)
    sent = 0
    for name, sha in names.items():
        target = f"{url}/{name}"
        size = (local / name).stat().st_size
        if record.get(name) == sha and call(lambda t=target: fs.exists(t) and fs.size(t), target) == size:
            continue
        call(lambda n=name, t=target: fs.put_file(str(local / n), t), target)
        record[name] = sha
        sent += 1
        atomic_write(record_path, json.dumps(record) + "\n")
    stale = [p for p in call(lambda: fs.ls(url, detail=False, refresh=True), url)
             if _SHARD_OBJECT.match(p.rsplit("/", 1)[-1]) and p.rsplit("/", 1)[-1] not in names]
    for path in stale:
        call(lambda p=path: fs.rm_file(p), path)
    body = json.dumps(manifest.to_dict(), indent=2).encode() + b"\n"
    call(lambda: fs.pipe_file(manifest_url, body), manifest_url)
    log.info("Uploaded %d files to %s (%d already there), then %s.", sent, url, len(names) - sent, MANIFEST_NAME)


def remove_staging(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
