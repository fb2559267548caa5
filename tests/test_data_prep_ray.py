"""`mptlike-prep --executor ray`: the same units as Ray tasks give the same bytes as a local run."""

import json
import os
import subprocess
import sys

import pytest

from mptlike.data import prep as prep_module
from mptlike.data import prepare
from mptlike.errors import MptlikeError


def _corpus(root):
    src = root / "in"
    src.mkdir()
    for i in range(8):
        (src / f"d{i}.txt").write_text(f"document {i}: " + "tokens and more tokens. " * (20 + 9 * i))
    rows = [json.dumps({"text": f"row {i} " * (i % 11 + 1)}) for i in range(200)]
    (src / "rows.jsonl").write_text("\n".join(rows) + "\n")
    return src


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_without_ray_the_cli_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    src = _corpus(tmp_path)
    code = prep_module.main([str(src), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "pip install 'mptlike[ray]'" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_tasks_write_the_same_bytes_as_local_workers(tmp_path, local_ray):
    src = _corpus(tmp_path)
    opts = dict(val_fraction=0.2, seed=3, shard_tokens=500, unit_bytes=800)
    prepare([src], tmp_path / "local", "bpe:320", workers=2, **opts)
    prepare([src], tmp_path / "ray", "bpe:320", executor="ray", **opts)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert local_ray.is_initialized()  # a Ray that prep did not start is left running
    # A bad line fails the run with the same one-sentence error a local run gives.
    (src / "zz.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(MptlikeError, match=r"zz.jsonl line 2 has no field 'text'"):
        prepare([src], tmp_path / "bad", "bytes", executor="ray", unit_bytes=800)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_joins_a_running_cluster_by_address(tmp_path, local_ray):
    src = _corpus(tmp_path)
    address = local_ray.get_runtime_context().gcs_address
    prepare([src], tmp_path / "ref", "bytes", val_fraction=0.0, unit_bytes=800)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = (
        "import sys; from mptlike.data import units; units.MIN_UNIT_BYTES = 800\n"
        "from mptlike.data.prep import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), "--out", str(out), "--tokenizer", "bytes", "--val-fraction", "0",
         "--executor", "ray", "--ray-address", address, "--workers", "2"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray, 2 at a time" in proc.stderr
    assert _files(out) == _files(tmp_path / "ref")
