"""Shards in object storage: a real S3 endpoint (moto's server) on localhost, reached over HTTP by s3fs.

The same corpus is prepared on local disk and uploaded with `prepare(..., out="s3://...")`; every claim
compares what is read from the bucket with what is read from the disk. Faults are real: a TCP proxy
between s3fs and the server resets connections and cuts responses, objects are overwritten in the
bucket, moto checks credentials.
"""

import hashlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from s3_helpers import FaultyProxy, enable_moto_auth, endpoint_with_bucket, s3_env, use_endpoint

from mptlike.data import TokenDataset, build_loader, remote
from mptlike.data.cache import SHARDS
from mptlike.data.manifest import Manifest
from mptlike.data.prep import main as prep_main
from mptlike.data.prep import prepare
from mptlike.data.remote import RemoteSettings, filesystem_type, open_remote
from mptlike.errors import MptlikeError

SEQ = 32
SHARD_TOKENS = 2048  # 4 KB shards: the json package makes 24 train and 10 val shards
BUCKET = "corpora"
FILES = sorted(Path(json.__file__).parent.glob("*.py"))
VAL = [textwrap.__file__]


@pytest.fixture(scope="module")
def endpoint():
    with endpoint_with_bucket(BUCKET) as e:
        yield e


@pytest.fixture(scope="module")
def corpus(endpoint, tmp_path_factory):
    """(local folder, its upload's URL): one preparation of the same inputs on disk and in the bucket."""
    root = tmp_path_factory.mktemp("remote")
    local = root / "local"
    prepare(FILES, local, "bytes", val_inputs=VAL, progress=False, shard_tokens=SHARD_TOKENS)
    url = f"s3://{BUCKET}/json"
    with pytest.MonkeyPatch.context() as mp:
        use_endpoint(mp, endpoint.url)
        prepare(FILES, url, "bytes", val_inputs=VAL, progress=False, shard_tokens=SHARD_TOKENS,
                storage=RemoteSettings(cache_dir=str(root / "staging")))
    return local, url


@pytest.fixture
def proxy(endpoint, monkeypatch):
    p = FaultyProxy(endpoint.port)
    use_endpoint(monkeypatch, p.url)
    yield p
    p.stop()


def settings(tmp_path, **kw):
    return RemoteSettings(**{"cache_dir": str(tmp_path / "cache"), "backoff_s": 0.01, **kw})


def all_windows(ds):
    return ds.windows(np.arange(len(ds)))


def cached(tmp_path):
    d = tmp_path / "cache" / SHARDS
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def copy_prefix(endpoint, src, dst):
    s3 = endpoint.client()
    for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix=src + "/")["Contents"]:
        s3.copy_object(Bucket=BUCKET, Key=dst + obj["Key"][len(src):], CopySource={"Bucket": BUCKET, "Key": obj["Key"]})
    return f"s3://{BUCKET}/{dst}"


def test_a_bucket_folder_reads_the_same_windows_as_its_local_twin_in_both_splits(corpus, proxy, tmp_path):
    local, url = corpus
    for split in ("train", "val"):
        a = TokenDataset(local, split, seq_len=SEQ)
        b = TokenDataset(url, split, seq_len=SEQ, remote=settings(tmp_path))
        assert len(a) == len(b) and b.where == url
        assert np.array_equal(all_windows(a), all_windows(b))
    assert Manifest.load(b.data_dir).to_dict() == Manifest.load(local).to_dict()
    # The view's remote.json may hold credentials (data.storage_options): readable by its owner only.
    assert (Path(b.data_dir) / "remote.json").stat().st_mode & 0o077 == 0
    # Every shard was fetched once, and is in the cache under its sha256.
    names = [s.name for ss in Manifest.load(local).shards.values() for s in ss]
    assert [proxy.gets(f"/json/{n}") for n in names] == [1] * len(names)
    shas = {s.sha256 for ss in Manifest.load(local).shards.values() for s in ss}
    assert {n[:-4] for n in cached(tmp_path) if n.endswith(".bin")} == shas


def test_the_loader_gives_the_same_batches_from_the_bucket_with_workers_too(corpus, proxy, tmp_path):
    local, url = corpus
    kw = dict(global_batch_size=8, micro_batch_size=2, rank=1, world_size=2, seed=3)
    want = list(itertools.islice(build_loader(TokenDataset(local, seq_len=SEQ), **kw), 40))
    for workers in (0, 2):
        ds = TokenDataset(url, seq_len=SEQ, remote=settings(tmp_path / str(workers)))
        got = list(itertools.islice(build_loader(ds, num_workers=workers, **kw), 40))
        assert all(np.array_equal(g["input_ids"], w["input_ids"]) and np.array_equal(g["labels"], w["labels"])
                   for g, w in zip(got, want))


def test_prep_to_s3_uploads_the_manifest_last_and_a_rerun_uploads_nothing(endpoint, proxy, tmp_path, capsys):
    out = f"s3://{BUCKET}/cli"
    args = [*map(str, FILES), "--out", out, "--tokenizer", "bytes", "--shard-tokens", str(SHARD_TOKENS),
            "--val-fraction", "0", "--cache-dir", str(tmp_path / "stage")]
    assert prep_main(args) == 0
    assert capsys.readouterr().out.startswith(f"{out}: train:")
    puts = [p.rsplit("/", 1)[-1] for m, p in proxy.forwarded if m == "PUT"]
    assert puts[-1] == "manifest.json" and puts.count("manifest.json") == 1
    assert sorted(puts[:-1]) == [f"train_{i:05d}.bin" for i in range(24)]
    assert not any((tmp_path / "stage" / "staging").iterdir())  # the staging folder is gone
    before = len(proxy.forwarded)
    assert prep_main(args) == 0
    assert {m for m, _ in proxy.forwarded[before:]} <= {"HEAD", "GET"}  # read the manifest: already prepared


def test_an_interrupted_upload_leaves_no_manifest_and_the_rerun_sends_only_the_rest(endpoint, proxy, tmp_path):
    out = f"s3://{BUCKET}/interrupted"
    seen = []
    proxy.reset_when = lambda m, p: m == "PUT" and (seen.append(p) or len(seen) > 5)  # the 6th PUT on, every time
    kw = dict(val_fraction=0.0, progress=False, shard_tokens=SHARD_TOKENS, storage=settings(tmp_path))
    with pytest.raises(MptlikeError) as e:
        prepare(FILES, out, "bytes", **kw)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"could not upload to {out}/train_")
    assert "5 attempts failed" in str(e.value) and str(e.value).endswith(
        "run the same command again: the upload resumes where it stopped, and the manifest is written only once every "
        "shard is there")
    keys = [o["Key"] for o in endpoint.client().list_objects_v2(Bucket=BUCKET, Prefix="interrupted/")["Contents"]]
    assert len(keys) == 5 and "interrupted/manifest.json" not in keys
    proxy.reset_when = None
    before = len(proxy.forwarded)
    prepare(FILES, out, "bytes", **kw)
    puts = [p.rsplit("/", 1)[-1] for m, p in proxy.forwarded[before:] if m == "PUT"]
    assert len(puts) == 24 - 5 + 1 and puts[-1] == "manifest.json"  # the five sent before are not sent again
    ds = TokenDataset(out, seq_len=SEQ, remote=settings(tmp_path))
    local = prepare(FILES, tmp_path / "local", "bytes", **{**kw, "storage": None})
    assert np.array_equal(all_windows(ds), all_windows(TokenDataset(local.data_dir, seq_len=SEQ)))


def test_connections_reset_or_cut_mid_body_are_retried_with_backoff(corpus, proxy, tmp_path, caplog):
    local, url = corpus
    proxy.reset_next = 3  # the manifest's first requests
    with caplog.at_level(logging.WARNING, logger="mptlike.data.remote"):
        ds = TokenDataset(url, seq_len=SEQ, remote=settings(tmp_path, retries=5))
        proxy.cut_next = 3  # the next shard bodies stop after 100 bytes
        got = all_windows(ds)
    assert np.array_equal(got, all_windows(TokenDataset(local, seq_len=SEQ)))
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    # aiohttp itself tries a reset request once more, so 3 resets are 1 or 2 attempts of ours; a cut body is one.
    assert 1 <= sum("manifest.json failed" in r for r in retries) <= 2
    assert sum("train_00000.bin failed (ClientPayloadError" in r for r in retries) == 3, retries
    assert proxy.cut_next == 0 and proxy.reset_next == 0
    assert not [n for n in cached(tmp_path) if n.endswith(".tmp")]


def test_a_server_that_keeps_failing_is_one_line_after_the_attempts_with_growing_waits(corpus, proxy, tmp_path):
    proxy.reset_next = 100
    start = time.perf_counter()
    with pytest.raises(MptlikeError) as e:
        open_remote(corpus[1], settings(tmp_path, retries=4, backoff_s=0.1))
    elapsed = time.perf_counter() - start
    assert str(e.value).startswith(f"could not read {corpus[1]}/manifest.json: 4 attempts failed, the last with ")
    assert len(proxy.requests) >= 4 and not proxy.forwarded
    assert elapsed >= 0.5 * (0.1 + 0.2 + 0.4)  # backoff 0.1 s doubling, at least half of each wait


def test_an_object_overwritten_in_the_bucket_is_one_line_and_leaves_nothing_in_the_cache(endpoint, corpus, proxy,
                                                                                         tmp_path):
    url = copy_prefix(endpoint, "json", "corrupt")
    s3 = endpoint.client()
    size = s3.head_object(Bucket=BUCKET, Key="corrupt/train_00001.bin")["ContentLength"]
    s3.put_object(Bucket=BUCKET, Key="corrupt/train_00001.bin", Body=bytes(size))  # same size, other bytes
    s3.put_object(Bucket=BUCKET, Key="corrupt/train_00002.bin", Body=b"short")
    ds = TokenDataset(url, seq_len=SEQ, remote=settings(tmp_path))
    first = SHARD_TOKENS // SEQ + 2  # a sample inside train_00001.bin
    with pytest.raises(MptlikeError) as e:
        ds.windows([first])
    assert str(e.value) == (f"Shard {url}/train_00001.bin does not match its sha256 in the manifest after 2 downloads: "
                            f"it was changed or damaged in the bucket; re-run `mptlike-prep INPUT... --out {url}` "
                            "(nothing of it was cached)")
    assert proxy.gets("corrupt/train_00001.bin") == 2
    with pytest.raises(MptlikeError, match=r"train_00002.bin is 5 bytes but the manifest expects 4096"):
        ds.windows([2 * SHARD_TOKENS // SEQ + 2])
    sha1 = Manifest.load(ds.data_dir).shards["train"][1].sha256
    assert not [n for n in cached(tmp_path) if n.endswith((".tmp", ".bin"))]
    assert f"{sha1}.lock" in cached(tmp_path)
    assert np.array_equal(ds.windows([0]), TokenDataset(corpus[0], seq_len=SEQ).windows([0]))  # the rest reads


def test_a_missing_bucket_and_a_missing_manifest_are_one_line_each(endpoint, proxy, tmp_path):
    with pytest.raises(MptlikeError) as e:
        TokenDataset("s3://no-such-bucket/json", seq_len=SEQ, remote=settings(tmp_path))
    assert str(e.value).startswith("bucket s3://no-such-bucket does not exist (for s3://no-such-bucket/json): "
                                   "check the URL and the endpoint")
    with pytest.raises(MptlikeError) as e:
        open_remote(f"s3://{BUCKET}/nothing-here", settings(tmp_path))
    assert str(e.value) == (f"data.path=s3://{BUCKET}/nothing-here has no manifest.json (preparation never finished "
                            "there, or the prefix is wrong): run `mptlike-prep INPUT... --out "
                            f"s3://{BUCKET}/nothing-here --tokenizer bytes` to (re)build it")
    with pytest.raises(MptlikeError, match="bucket s3://no-such-bucket does not exist"):
        prepare(FILES[:1], "s3://no-such-bucket/x", "bytes", progress=False, storage=settings(tmp_path))
    assert not (tmp_path / "cache" / "staging").exists() or not any((tmp_path / "cache" / "staging").iterdir())
    assert not (tmp_path / "cache" / "folders").exists()


def test_access_denied_by_the_server_is_one_line(endpoint, corpus, monkeypatch, tmp_path):
    iam = __import__("boto3").client("iam", endpoint_url=endpoint.url, aws_access_key_id="testing",
                                     aws_secret_access_key="testing", region_name="us-east-1")
    iam.create_user(UserName="nobody")  # a real user with no policy: may read nothing
    keys = iam.create_access_key(UserName="nobody")["AccessKey"]
    use_endpoint(monkeypatch, endpoint.url, key=keys["AccessKeyId"], secret=keys["SecretAccessKey"])
    enable_moto_auth(endpoint, True)
    try:
        with pytest.raises(MptlikeError) as e:
            TokenDataset(corpus[1], seq_len=SEQ, remote=settings(tmp_path))
    finally:
        enable_moto_auth(endpoint, False)
    assert str(e.value).startswith(f"access to {corpus[1]}/manifest.json was denied (")
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE" in str(e.value)


def test_no_credentials_at_all_is_one_line(endpoint, corpus, monkeypatch, tmp_path):
    # botocore raises NoCredentialsError, which s3fs passes on as it is: a cluster node without keys.
    use_endpoint(monkeypatch, endpoint.url)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    with pytest.raises(MptlikeError) as e:
        TokenDataset(corpus[1], seq_len=SEQ, remote=settings(tmp_path))
    assert str(e.value).startswith(f"access to s3://{BUCKET}/")
    assert "was denied (Unable to locate credentials)" in str(e.value)
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_cache_disk_without_room_is_one_line_and_keeps_nothing_half_written(corpus, proxy, tmp_path):
    # A real write failure: the child process may not write files over 1000 bytes (RLIMIT_FSIZE: EFBIG, the
    # kernel's answer a full disk or a quota gives as ENOSPC/EDQUOT). The view is opened here first, so the
    # child only downloads shards (4 KB each).
    url = corpus[1]
    TokenDataset(url, seq_len=SEQ, remote=settings(tmp_path, prefetch_shards=0))  # the child's settings
    child = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        from mptlike.data import TokenDataset
        from mptlike.data.remote import RemoteSettings
        from mptlike.errors import MptlikeError
        ds = TokenDataset({url!r}, seq_len={SEQ}, remote=RemoteSettings(cache_dir={str(tmp_path / "cache")!r},
                                                                        prefetch_shards=0, backoff_s=0.01))
        try:
            ds[0]
        except MptlikeError as exc:
            print(exc)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith(f"the shard cache {tmp_path / 'cache' / SHARDS} ran out of room")
    assert "data.cache_max_gb" in line and "data.cache_dir" in line
    assert not [n for n in cached(tmp_path) if n.endswith((".bin", ".tmp"))]


def test_the_cache_stays_under_its_bound_by_evicting_least_recently_used_shards(corpus, proxy, tmp_path, caplog):
    local, url = corpus
    bound = 6 * 2 * SHARD_TOKENS  # six shards; a reader pins at most 4 (its minimum) + prefetch_shards
    ds = TokenDataset(url, seq_len=SEQ, remote=settings(tmp_path, cache_max_gb=bound / 1e9, prefetch_shards=2))
    kw = dict(global_batch_size=8, micro_batch_size=4, rank=0, world_size=1, seed=9)
    want = itertools.islice(build_loader(TokenDataset(local, seq_len=SEQ), **kw), 30)
    shards = tmp_path / "cache" / SHARDS
    sizes = []
    with caplog.at_level(logging.WARNING):
        for got, ref in zip(build_loader(ds, **kw), want):
            assert np.array_equal(got["input_ids"], ref["input_ids"])
            sizes.append(sum(p.stat().st_size for p in shards.glob("*.bin")))
    assert max(sizes) <= bound
    downloads = sum(proxy.gets(f"/json/train_{i:05d}.bin") for i in range(24))
    assert downloads > 24  # shards were evicted and fetched again
    assert not [r for r in caplog.records if "data.cache_max_gb" in r.getMessage()]


def test_prefetch_fetches_the_next_shards_before_the_loader_reads_them(corpus, proxy, tmp_path):
    _, url = corpus
    ds = TokenDataset(url, seq_len=SEQ, remote=settings(tmp_path, prefetch_shards=3))
    loader = build_loader(ds, global_batch_size=4, micro_batch_size=1, rank=0, world_size=1, seed=4)
    ids = loader.batch_ids(0)
    it = iter(loader)
    next(it)
    upcoming = [shard for i in ids[1:] for _, shard in ds.remote_shards([i])]
    cache = ds.remote_shards([0])[0][0]
    deadline = time.time() + 10
    while not all(cache.is_cached(s) for s in upcoming[:3]) and time.time() < deadline:
        time.sleep(0.01)
    assert all(cache.is_cached(s) for s in upcoming[:3])
    before = len(proxy.forwarded)
    next(it)  # its shard is already here: the loader does not wait on the network
    assert not [r for r in proxy.forwarded[before:] if r[1].endswith(upcoming[0].url.rsplit("/", 1)[-1])]


def test_a_cache_deleted_mid_iteration_is_fetched_again_and_the_batches_do_not_change(corpus, proxy, tmp_path):
    local, url = corpus
    kw = dict(global_batch_size=8, micro_batch_size=8, rank=0, world_size=1, seed=2)
    # Room for every shard, and a reader that keeps 6 mapped: after a delete it needs some of the others again.
    ds = TokenDataset(url, seq_len=SEQ, remote=settings(tmp_path, cache_max_gb=24 * 2 * SHARD_TOKENS / 1e9))
    want = list(itertools.islice(build_loader(TokenDataset(local, seq_len=SEQ), **kw), 12))
    got = []
    for i, batch in enumerate(itertools.islice(build_loader(ds, **kw), 12)):
        got.append(batch)
        if i in (3, 7):
            while (tmp_path / "cache").exists():  # the prefetch thread may be writing into it: as `rm -rf` again
                shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    assert all(np.array_equal(g["input_ids"], w["input_ids"]) for g, w in zip(got, want))
    assert max(proxy.gets(f"/json/train_{i:05d}.bin") for i in range(24)) >= 2  # fetched again after a delete
    time.sleep(1.1)
    ds.windows([0])
    assert (ds.data_dir / "manifest.json").is_file()  # the view was written again too (checked once a second)


_READER = """
import hashlib, sys
import numpy as np
from mptlike.data import TokenDataset
from mptlike.data.remote import RemoteSettings
ds = TokenDataset(sys.argv[1], seq_len=32, remote=RemoteSettings(cache_dir=sys.argv[2], prefetch_shards=0))
print(hashlib.sha256(ds.windows(np.arange(len(ds))).tobytes()).hexdigest())
"""


def test_two_processes_sharing_a_cache_download_each_shard_once(corpus, proxy, tmp_path):
    local, url = corpus
    proxy.delay = 0.05  # every request takes a while: the two readers overlap
    env = s3_env(proxy.url)
    procs = [subprocess.Popen([sys.executable, "-c", _READER, url, str(tmp_path / "cache")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    want = hashlib.sha256(all_windows(TokenDataset(local, seq_len=SEQ)).tobytes()).hexdigest()
    assert [o[0].strip() for o in outs] == [want, want]
    assert [proxy.gets(f"/json/train_{i:05d}.bin") for i in range(24)] == [1] * 24


def test_a_url_whose_protocol_package_is_missing_names_it(tmp_path):
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(MptlikeError, match=r"^gs://bucket/data needs a package that is not installed \(.*gcsfs"):
        TokenDataset("gs://bucket/data", seq_len=SEQ, remote=settings(tmp_path))


def test_bad_cache_settings_name_the_key():
    with pytest.raises(MptlikeError, match=r"^data.prefetch_shards=-1 is invalid"):
        RemoteSettings(prefetch_shards=-1)
    with pytest.raises(MptlikeError, match=r"^data.remote_retries=0 is invalid: use a number of attempts"):
        RemoteSettings(retries=0)


MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:40 / /home rw,relatime shared:20 - nfs4 fileserver:/export/home rw,vers=4.2
41 22 0:41 / /scratch\040space rw,relatime shared:21 - lustre 10.0.0.1@o2ib:/fs rw,flock
42 40 0:42 / /home/local rw,relatime shared:22 - xfs /dev/nvme0n1 rw
"""


def test_the_file_system_of_a_path_is_that_of_the_longest_mount_point_above_it():
    assert filesystem_type(Path("/"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/tmp/x"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/home/me/.cache/mptlike"), MOUNTINFO) == "nfs4"
    assert filesystem_type(Path("/homework"), MOUNTINFO) == "ext4"  # a prefix of the name is not a mount
    assert filesystem_type(Path("/home/local/cache"), MOUNTINFO) == "xfs"
    assert filesystem_type(Path("/scratch space/c"), MOUNTINFO) == "lustre"
    assert filesystem_type(Path("/x"), "") is None


def test_a_cache_on_a_shared_file_system_moves_to_local_disk_by_default_and_is_refused_when_chosen(
        monkeypatch, tmp_path, caplog):
    # The one function that reads /proc/self/mountinfo answers as a cluster node whose tmp_path is on NFS.
    monkeypatch.setattr(remote, "_mountinfo", lambda: f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                                                      f"40 22 0:40 / {tmp_path} rw - nfs4 srv:/home rw\n")
    monkeypatch.delenv("MPTLIKE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path.parent))
    with caplog.at_level(logging.WARNING):
        root = RemoteSettings().root
    assert root == tmp_path.parent / f"mptlike-cache-{os.getuid()}"
    assert "nfs4 file system that several nodes share" in caplog.text
    with pytest.raises(MptlikeError) as e:
        remote.cache_root(str(tmp_path / "cache"))
    assert str(e.value).startswith(f"the shard cache {tmp_path / 'cache'} (data.cache_dir or $MPTLIKE_CACHE) is on a "
                                   "nfs4 file system")
    assert RemoteSettings(cache_dir=str(tmp_path.parent / "local-cache")).root == tmp_path.parent / "local-cache"
