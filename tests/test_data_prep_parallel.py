"""`mptlike-prep --workers N`: the same bytes whatever N, the unit size or the input cuts."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mptlike.data import prep as prep_module
from mptlike.data import prepare, units
from mptlike.errors import MptlikeError

LINES = [f"line {i}: " + "word " * (i % 13) + ("ünïcödé 🚀" if i % 7 == 0 else "") for i in range(120)]


def _corpus(root):
    """txt, jsonl (blank lines, no final newline, CRLF) and parquet (two row groups) in one folder."""
    src = root / "in"
    src.mkdir()
    for i in range(6):
        text = f"Text file {i}.\n" + "def f(x):\n    return x\n" * (i * 7)
        (src / f"a{i:02d}.txt").write_text(text, encoding="utf-8")
    rows = [json.dumps({"text": t, "n": i}) for i, t in enumerate(LINES)]
    (src / "b.jsonl").write_text("\n".join(rows[:60]) + "\n\n" + "\r\n".join(rows[60:]), encoding="utf-8")
    table = pa.table({"text": LINES[::-1] + [None, ""]})
    pq.write_table(table, src / "c.parquet", row_group_size=50)
    (src / "d.txt").write_text("the last document", encoding="utf-8")
    return src


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("tokenizer", ["bpe:400", "bytes"])
def test_workers_1_2_3_write_identical_shards_and_manifest(tmp_path, corpus, tokenizer, caplog):
    caplog.set_level(logging.INFO)
    outputs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        prepare([corpus], out, tokenizer, val_fraction=0.2, seed=5, shard_tokens=700, workers=workers,
                unit_bytes=600, progress=False)
        outputs[workers] = _files(out)
    assert outputs[1] == outputs[2] == outputs[3]
    names = set(outputs[1])
    assert {"manifest.json", "train_00000.bin", "val_00000.bin"} <= names and ".prep-work" not in names
    assert ("tokenizer.json" in names) == tokenizer.startswith("bpe")
    assert "(2 worker processes)" in caplog.text and "(3 worker processes)" in caplog.text
    # A unit size that puts everything in one unit gives the same bytes as well.
    prepare([corpus], tmp_path / "one", tokenizer, val_fraction=0.2, seed=5, shard_tokens=700, unit_bytes=1 << 30)
    assert _files(tmp_path / "one") == outputs[1]


def test_val_inputs_and_the_cli_with_workers(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(units, "MIN_UNIT_BYTES", 512)  # the CLI's automatic unit size, shrunk for a tiny corpus
    val = tmp_path / "val"
    val.mkdir()
    (val / "v.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in LINES[:40]), encoding="utf-8")
    ref = tmp_path / "ref"
    prepare([corpus], ref, "bytes", val_inputs=[val], shard_tokens=1000, workers=1)
    for workers in ("2", "auto"):
        out = tmp_path / f"cli{workers}"
        args = [str(corpus), "--out", str(out), "--tokenizer", "bytes", "--val", str(val), "--shard-tokens", "1000"]
        assert prep_module.main([*args, "--workers", workers]) == 0
        assert _files(out) == _files(ref)
    assert "val: " in capsys.readouterr().out


def test_jsonl_cut_at_any_byte_reads_every_line_once(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [json.dumps({"text": t}) for t in LINES[:12]]  # ~500 bytes: unit_bytes=1 cuts after every byte
    path.write_bytes(("\n".join(rows[:5]) + "\n\n\n" + "\r\n".join(rows[5:])).encode())
    ref = None
    for unit_bytes in (1, 7, 64, 1 << 20):
        out = tmp_path / f"u{unit_bytes}"
        m = prepare([path], out, "bytes", val_fraction=0.0, unit_bytes=unit_bytes)
        assert m.num_documents["train"] == 12
        ref = ref or _files(out)
        assert _files(out) == ref
    expected = [b for t in LINES[:12] for b in list(t.encode()) + [256]]
    assert np.fromfile(tmp_path / "u1" / "train_00000.bin", dtype="<u2").tolist() == expected


def test_unit_plan_cuts_files_the_same_way_every_time(tmp_path, corpus):
    files = sorted(p for p in corpus.iterdir())
    plan = units.plan_units(files, [], 600, "text")
    again = units.plan_units(files, [], 600, "text")
    assert plan == again and len(plan) > 3
    pieces = [p for u in plan for p in u.pieces]
    parquet = [p for p in pieces if p.path.endswith(".parquet")]
    assert [p.row_groups for p in parquet] == [(0,), (1,), (2,)]
    jsonl = [p for p in pieces if p.path.endswith(".jsonl")]
    assert jsonl[0].start == 0 and jsonl[-1].end == (corpus / "b.jsonl").stat().st_size
    assert all(a.end == b.start for a, b in zip(jsonl, jsonl[1:]))
    keyed = units.with_keys(plan, "digest", "uint16")
    assert len({u.key for u in keyed}) == len(plan)
    assert [u.key for u in units.with_keys(plan, "other", "uint16")] != [u.key for u in keyed]


def test_a_bad_jsonl_line_is_named_from_any_worker(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"text": t}) for t in LINES[:20]] + ['{"body": "x"}', "{}"]) + "\n")
    for workers in (1, 2):
        with pytest.raises(MptlikeError, match=r"d.jsonl line 21 has no field 'text'.*--text-field"):
            prepare([path], tmp_path / "out", "bytes", workers=workers, unit_bytes=100)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_cli_rejects_bad_workers_with_one_line(tmp_path, capsys, corpus, value):
    code = prep_module.main([str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--workers", value])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"--workers {value} must be a number of processes" in err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_an_unknown_executor_with_one_line(tmp_path, capsys, corpus):
    code = prep_module.main([str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--executor", "dask"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--executor 'dask' is not one of local, ray" in err
    assert not (tmp_path / "out").exists()


def test_library_rejects_negative_workers_and_a_stray_ray_address(tmp_path, corpus):
    with pytest.raises(MptlikeError, match=r"--workers -2 must be a number of processes"):
        prepare([corpus], tmp_path / "out", "bytes", workers=-2)
    with pytest.raises(MptlikeError, match=r"--ray-address is only used with --executor ray"):
        prepare([corpus], tmp_path / "out", "bytes", ray_address="auto")
    assert not (tmp_path / "out").exists()
