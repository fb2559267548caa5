"""A killed or interrupted `mptlike-prep` resumes: finished work units are reused, stale ones dropped."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mptlike import faults
from mptlike.data import prepare, units
from mptlike.data.shards import ShardWriter

UNIT_BYTES = 2048
_CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from mptlike.data import prepare
prepare([sys.argv[1]], sys.argv[2], "bpe:300", workers=2, unit_bytes=int(sys.argv[3]), val_fraction=0.1)
"""


def _corpus(root, n=16):
    src = root / "in"
    src.mkdir()
    for i in range(n):
        body = "".join(f"paragraph {j} of file {i}: the quick brown fox {i * j}\n" for j in range(40))
        (src / f"doc{i:02d}.txt").write_text(body, encoding="utf-8")
    return src


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _finished(out):
    work = out / units.WORK_DIR
    return {p.stem for p in work.glob("*.json") if not p.name.startswith("bpe-")} if work.is_dir() else set()


def _spy(monkeypatch):
    """Record every unit tokenized in this process (the rerun runs with workers=1, in-process)."""
    seen = []
    real = units.tokenize_units

    def spy(group, *args, **kwargs):
        seen.extend(u.key for u in group)
        return real(group, *args, **kwargs)

    monkeypatch.setattr(units, "tokenize_units", spy)
    return seen


def _counts(text):
    m = re.search(r"(\d+) work units of .*: (\d+) to tokenize.*, (\d+) reused", text)
    return tuple(map(int, m.groups()))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_tokenizes_only_the_missing_units(tmp_path, monkeypatch, caplog):
    src = _corpus(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, faults.ENV: "prep_unit_delay_s=0.5"}  # each unit waits: a kill lands mid-run
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(src), str(out), str(UNIT_BYTES)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while len(_finished(out)) < 3:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no work unit finished in 90 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent, its fork server and its workers
        proc.wait(timeout=30)
    log = proc.stdout.read()
    assert proc.returncode == -signal.SIGKILL
    total = _counts(log)[0]
    done = _finished(out)
    assert not (out / "manifest.json").exists()
    assert 3 <= len(done) < total, log
    assert (out / units.WORK_DIR / "bpe-tokenizer.json").is_file()

    caplog.set_level(logging.INFO)
    tokenized = _spy(monkeypatch)
    monkeypatch.delenv(faults.ENV, raising=False)
    prepare([src], out, "bpe:300", workers=1, unit_bytes=UNIT_BYTES, val_fraction=0.1)
    assert "Reusing the bpe:300 trained by an interrupted run" in caplog.text
    assert _counts(caplog.text) == (total, total - len(done), len(done))
    assert f"Tokenized {total - len(done)} work units, reused {len(done)}." in caplog.text
    assert len(tokenized) == total - len(done) and not set(tokenized) & done

    ref = tmp_path / "ref"
    prepare([src], ref, "bpe:300", workers=2, unit_bytes=UNIT_BYTES, val_fraction=0.1)
    assert _files(out) == _files(ref)
    assert units.WORK_DIR not in _files(out)


def _interrupt_after_units(monkeypatch, n_writes):
    """Make the n-th shard write raise KeyboardInterrupt, as Ctrl-C would."""
    real_write = ShardWriter.write
    calls = []

    def flaky_write(self, tokens):
        calls.append(1)
        if len(calls) == n_writes:
            raise KeyboardInterrupt
        real_write(self, tokens)

    monkeypatch.setattr(ShardWriter, "write", flaky_write)
    return lambda: monkeypatch.setattr(ShardWriter, "write", real_write)


def test_interrupted_units_are_reused_across_split_and_shard_options(tmp_path, monkeypatch, caplog):
    src = _corpus(tmp_path, n=8)
    out = tmp_path / "out"
    restore = _interrupt_after_units(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, "bytes", val_fraction=0.0, unit_bytes=UNIT_BYTES)
    restore()
    done = _finished(out)
    assert len(done) >= 4
    # The train/val split and the shard size are applied while copying units: changing them reuses units.
    caplog.set_level(logging.INFO)
    tokenized = _spy(monkeypatch)
    prepare([src], out, "bytes", val_fraction=0.3, seed=2, shard_tokens=999, unit_bytes=UNIT_BYTES)
    assert not set(tokenized) & done and _counts(caplog.text)[2] == len(done)
    prepare([src], tmp_path / "ref", "bytes", val_fraction=0.3, seed=2, shard_tokens=999, unit_bytes=UNIT_BYTES)
    assert _files(out) == _files(tmp_path / "ref")


def test_stale_units_from_other_inputs_or_tokenizer_are_discarded(tmp_path, monkeypatch, caplog):
    src = _corpus(tmp_path, n=8)
    out = tmp_path / "out"
    restore = _interrupt_after_units(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, "bytes", val_fraction=0.0, unit_bytes=UNIT_BYTES)
    restore()
    old = _finished(out)
    assert old
    caplog.set_level(logging.INFO)
    tokenized = _spy(monkeypatch)
    # Another tokenizer: nothing is reused, and the old units are deleted.
    restore = _interrupt_after_units(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, "bpe:300", val_fraction=0.0, unit_bytes=UNIT_BYTES)
    restore()
    assert _counts(caplog.text)[2] == 0 and not _finished(out) & old
    # An edited input: only the units reading that file are redone.
    before = _finished(out)
    first = sorted(src.iterdir())[0]
    first.write_text(first.read_text() + "an edit\n")
    caplog.clear()
    tokenized.clear()
    prepare([src], out, "bpe:300", val_fraction=0.0, unit_bytes=UNIT_BYTES)
    total, todo, reused = _counts(caplog.text)
    assert reused == len(before) - 1 and todo == total - reused == len(tokenized)
    prepare([src], tmp_path / "ref", "bpe:300", val_fraction=0.0, unit_bytes=UNIT_BYTES)
    assert _files(out) == _files(tmp_path / "ref")


def test_damaged_or_half_written_units_are_redone(tmp_path, monkeypatch, caplog):
    src = _corpus(tmp_path, n=12)
    out = tmp_path / "out"
    restore = _interrupt_after_units(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, "bytes", val_fraction=0.0, unit_bytes=UNIT_BYTES)
    restore()
    work = out / units.WORK_DIR
    keys = sorted(_finished(out))
    assert len(keys) >= 3
    flipped = bytearray((work / f"{keys[0]}.bin").read_bytes())
    flipped[0] ^= 1  # same size, wrong content: caught by the sha256 when the unit is read back
    (work / f"{keys[0]}.bin").write_bytes(bytes(flipped))
    (work / f"{keys[1]}.bin").write_bytes(b"short")  # wrong size: not counted as finished
    rec = json.loads((work / f"{keys[2]}.json").read_text())
    (work / f"{keys[2]}.json").write_text(json.dumps({**rec, "format": 99}))  # unknown record format
    (work / ".abc.bin.tmp").write_bytes(b"half")
    caplog.set_level(logging.INFO)
    prepare([src], out, "bytes", val_fraction=0.0, unit_bytes=UNIT_BYTES)
    assert "is damaged; tokenizing it again" in caplog.text
    assert _counts(caplog.text)[2] == len(keys) - 2
    prepare([src], tmp_path / "ref", "bytes", val_fraction=0.0, unit_bytes=UNIT_BYTES)
    assert _files(out) == _files(tmp_path / "ref")
