"""Training from shards in object storage (moto's S3 server on localhost): the same samples, losses and
validation losses as from the same folder on local disk, for data.path and for a mixture source, also
when the cache folder is deleted while the run reads it; and mptlike-eval on a bucket URL."""

import json
import shutil
from pathlib import Path

import pytest
from s3_helpers import FaultyProxy, endpoint_with_bucket, use_endpoint
from train_helpers import losses, tiny_args, torchrun

from mptlike.cli.eval import main as eval_main
from mptlike.data.prep import main as prep_main
from mptlike.integrations.checkpoint_io import read_checkpoint
from mptlike.train.cli import main as train_main

BUCKET = "train-data"
LIB = Path(json.__file__).parent.parent


@pytest.fixture(scope="module")
def endpoint():
    with endpoint_with_bucket(BUCKET) as e:
        yield e


@pytest.fixture(scope="module")
def corpora(endpoint, tmp_path_factory):
    """Two corpora, each on disk and uploaded by `mptlike-prep --out s3://...`: {name: (folder, url)}."""
    root = tmp_path_factory.mktemp("train-remote")
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        use_endpoint(mp, endpoint.url)
        for name, files, val in [("code", sorted((LIB / "json").glob("*.py")), LIB / "textwrap.py"),
                                 ("prose", [LIB / "this.py", LIB / "string.py"], LIB / "keyword.py")]:
            args = [*map(str, files), "--tokenizer", "bytes", "--val", str(val), "--shard-tokens", "4096"]
            assert prep_main([*args, "--out", str(root / name)]) == 0
            assert prep_main([*args, "--out", f"s3://{BUCKET}/{name}", "--cache-dir", str(root / "stage")]) == 0
            made[name] = (root / name, f"s3://{BUCKET}/{name}")
    return made


def _samples(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines()]


def _train(data, run_dir, *extra):
    assert train_main(tiny_args(data, run_dir, "debug.log_sample_ids=true", *extra)) == 0
    return _samples(run_dir), losses(run_dir), losses(run_dir, "val/loss")


@pytest.fixture(scope="module")
def local_run(corpora, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local-run")
    return run_dir, _train(corpora["code"][0], run_dir)


def remote_args(cache):
    return [f"data.cache_dir={cache}", "data.remote_backoff_s=0.01", "data.prefetch_shards=2"]


def test_training_from_a_bucket_sees_the_same_samples_and_losses_as_from_local_disk(corpora, local_run, endpoint,
                                                                                    monkeypatch, tmp_path, capsys):
    use_endpoint(monkeypatch, endpoint.url)
    samples, train_loss, val_loss = _train(corpora["code"][1], tmp_path / "run", *remote_args(tmp_path / "cache"))
    assert (samples, train_loss, val_loss) == local_run[1]
    assert sorted(val_loss) == [3, 6]
    # mptlike-generate and mptlike-eval --tasks find the run's tokenizer in the local copy of its manifest.
    assert read_checkpoint(tmp_path / "run").tokenizer.spec == "bytes"
    # mptlike-eval reads the bucket through the same dataset: the same loss as on the local folder.
    monkeypatch.setenv("MPTLIKE_CACHE", str(tmp_path / "eval-cache"))
    results = []
    for data in (corpora["code"][1], corpora["code"][0]):
        assert eval_main([str(local_run[0]), "--data", str(data), "--max-batches", "2", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["loss"] == results[1]["loss"] and results[0]["windows"] == 16
    assert results[0]["data"] == corpora["code"][1]


def test_a_cache_deleted_while_the_run_reads_it_changes_nothing(corpora, local_run, endpoint, monkeypatch, tmp_path):
    proxy = FaultyProxy(endpoint.port)
    use_endpoint(monkeypatch, proxy.url)
    cache = tmp_path / "cache"
    gets = []

    def delete_cache_now_and_then(method, path):
        if method == "GET" and path.endswith(".bin"):
            gets.append(path)
            if len(gets) in (4, 9):
                while cache.exists():  # as `rm -rf` would, again if a download wrote into it meanwhile
                    shutil.rmtree(cache, ignore_errors=True)

    proxy.on_request = delete_cache_now_and_then
    try:
        # A bound of 16 of its 8 KB shards: the reader keeps 4 mapped, so it needs others again after a delete.
        result = _train(corpora["code"][1], tmp_path / "run", *remote_args(cache), "data.cache_max_gb=0.000131")
    finally:
        proxy.stop()
    assert result == local_run[1]
    assert len(gets) > len(set(gets))  # some shards were downloaded again after a delete


@pytest.mark.slow
def test_two_ranks_of_a_node_share_the_cache_and_download_each_shard_once(corpora, local_run, endpoint,
                                                                          monkeypatch, tmp_path):
    proxy = FaultyProxy(endpoint.port)
    use_endpoint(monkeypatch, proxy.url)
    try:
        torchrun(tiny_args(corpora["code"][1], tmp_path / "run", "debug.log_sample_ids=true",
                           *remote_args(tmp_path / "cache")), nproc=2)
    finally:
        proxy.stop()
    assert _samples(tmp_path / "run") == local_run[1][0]  # the global order does not depend on the world size
    gets = [path for method, path in proxy.forwarded if method == "GET" and path.endswith(".bin")]
    assert gets and len(gets) == len(set(gets))


def test_a_mixture_with_one_source_in_a_bucket_trains_like_its_local_twin(corpora, endpoint, monkeypatch, tmp_path):
    use_endpoint(monkeypatch, endpoint.url)
    code = corpora["code"][0]

    def run(prose, run_dir):
        sources = f"{{path: {code}, weight: 2}}, {{path: '{prose}', weight: 1, name: prose}}"
        args = tiny_args(code, run_dir, "data=mixture", f"data.sources=[{sources}]", "debug.log_sample_ids=true",
                         *remote_args(tmp_path / "cache"))
        args.remove(f"data.path={code}")
        assert train_main(args) == 0
        return _samples(run_dir), losses(run_dir), losses(run_dir, "val/prose/loss")

    remote, local = run(corpora["prose"][1], tmp_path / "remote"), run(corpora["prose"][0], tmp_path / "local")
    assert remote == local
    assert any(s.startswith("prose:") for row in remote[0] for s in row["samples"])
    assert sorted(remote[2]) == [3, 6]


def test_a_bucket_data_path_that_does_not_exist_stops_the_run_with_one_line(endpoint, monkeypatch, tmp_path, capsys):
    use_endpoint(monkeypatch, endpoint.url)
    url = f"s3://{BUCKET}/never-prepared"
    assert train_main(tiny_args(url, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mptlike-train: error: data.path={url} has no manifest.json (preparation never finished there, or "
                   f"the prefix is wrong): run `mptlike-prep INPUT... --out {url} --tokenizer bytes` to (re)build it"]
    assert not (tmp_path / "run").exists()


