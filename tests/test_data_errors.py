import json
import subprocess
import sys

import numpy as np
import pytest

from mptlike.data import Manifest, TokenDataset, check_compatible, prepare
from mptlike.data import prep as prep_module
from mptlike.data.shards import ShardWriter, write_token_folder
from mptlike.errors import MptlikeError


@pytest.fixture
def folder(tmp_path):
    stream = np.arange(1, 200) % 250
    write_token_folder(
        tmp_path / "data", {"train": [stream]}, tokenizer="bytes", vocab_size=257, eos_id=256, shard_tokens=64
    )
    return tmp_path / "data"


def _corpus(tmp_path, n=3):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        (src / f"d{i}.txt").write_text(f"document {i} " * 50)
    return src


def test_truncated_shard_is_named_with_the_fix(folder):
    shard = folder / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(MptlikeError, match=r"train_00001\.bin.*truncated or corrupt.*mptlike-prep"):
        TokenDataset(folder, seq_len=8)


def test_missing_shard_is_named(folder):
    (folder / "train_00002.bin").unlink()
    with pytest.raises(MptlikeError, match=r"train_00002\.bin.*missing"):
        TokenDataset(folder, seq_len=8)


def test_checksum_mismatch_is_caught_only_when_verifying(folder):
    shard = folder / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    TokenDataset(folder, seq_len=8)  # same size: the cheap check passes
    with pytest.raises(MptlikeError, match=r"train_00000\.bin.*sha256"):
        TokenDataset(folder, seq_len=8, verify=True)


def test_data_from_another_tokenizer_is_refused(folder):
    with pytest.raises(MptlikeError, match=r"tokenized with 'bytes' but tokenizer 'bpe:8192'"):
        TokenDataset(folder, seq_len=8, expected_tokenizer="bpe:8192")
    TokenDataset(folder, seq_len=8, expected_tokenizer="bytes")


def test_model_vocab_smaller_than_the_tokenizer_is_refused(folder):
    m = Manifest.load(folder)
    with pytest.raises(MptlikeError, match=r"model.vocab_size=256 .* at least 257"):
        check_compatible(m, vocab_size=256)
    check_compatible(m, vocab_size=50432)
    with pytest.raises(MptlikeError, match="model.vocab_size=100"):
        TokenDataset(folder, seq_len=8, expected_vocab_size=100)


def test_sequence_longer_than_the_split_is_refused(folder):
    with pytest.raises(MptlikeError, match=r"'train'.*199 tokens.*seq_len\+1=200"):
        TokenDataset(folder, seq_len=199)
    assert len(TokenDataset(folder, seq_len=198)) == 1


def test_missing_folder_and_missing_manifest_say_how_to_prepare(tmp_path, folder):
    with pytest.raises(MptlikeError, match=r"does not exist.*mptlike-prep"):
        TokenDataset(tmp_path / "nowhere", seq_len=8)
    (folder / "manifest.json").unlink()
    with pytest.raises(MptlikeError, match=r"no manifest.json.*mptlike-prep"):
        TokenDataset(folder, seq_len=8)


def test_unreadable_manifest_is_named(folder):
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(MptlikeError, match=r"manifest.json is not valid JSON"):
        Manifest.load(folder)


def test_unknown_split_lists_the_existing_ones(folder):
    with pytest.raises(MptlikeError, match=r"no split 'val'.*\['train'\]"):
        TokenDataset(folder, "val", seq_len=8)


def test_empty_input_fails_and_leaves_nothing(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("")
    (src / "b.jsonl").write_text('{"text": ""}\n\n')
    out = tmp_path / "out"
    for tok in ("bytes", "bpe:300"):
        with pytest.raises(MptlikeError, match=r"in hold no text"):
            prepare([src], out, tok)
        assert not out.exists()


def test_folder_without_text_files_is_named(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(MptlikeError, match=r"in holds no \.txt, \.jsonl, \.parquet files"):
        prepare([tmp_path / "in"], tmp_path / "out", "bytes")
    assert not (tmp_path / "out").exists()


def test_missing_jsonl_field_names_file_and_line_and_leaves_nothing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    with pytest.raises(MptlikeError, match=r"d.jsonl line 2 has no field 'text'.*--text-field"):
        prepare([path], tmp_path / "out", "bytes")
    assert not (tmp_path / "out").exists()


def test_failed_rerun_keeps_the_previous_preparation_intact(tmp_path):
    src = _corpus(tmp_path)
    out = tmp_path / "out"
    first = prepare([src], out, "bytes", val_fraction=0.0, shard_tokens=100)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (src / "zz.jsonl").write_text("not json\n")
    with pytest.raises(MptlikeError, match=r"zz.jsonl line 1 is not valid JSON"):
        prepare([src], out, "bytes", val_fraction=0.0, shard_tokens=100)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert Manifest.load(out).to_dict() == first.to_dict()


def test_interrupted_run_leaves_no_manifest_and_a_rerun_completes(tmp_path, monkeypatch):
    src = _corpus(tmp_path, n=6)
    out = tmp_path / "out"
    real_write = ShardWriter.write
    calls = []

    def flaky_write(self, tokens):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(self, tokens)

    monkeypatch.setattr(ShardWriter, "write", flaky_write)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, "bytes", val_fraction=0.0, shard_tokens=64, unit_bytes=1)
    # No manifest and no shard; only the finished work units, kept for the rerun.
    assert [p.name for p in out.iterdir()] == [".prep-work"]
    # A hard kill leaves temporaries behind; a rerun must clean them and finish.
    (out / ".train_00000.bin.tmp").write_bytes(b"junk")
    (out / "train_00007.bin").write_bytes(b"stale")
    (out / ".prep-work" / ".0123.bin.tmp").write_bytes(b"half a unit")
    monkeypatch.setattr(ShardWriter, "write", real_write)
    m = prepare([src], out, "bytes", val_fraction=0.0, shard_tokens=64, unit_bytes=1)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["manifest.json"] + [s.name for s in m.shards["train"]])
    assert len(TokenDataset(out, seq_len=16)) > 0


def test_cli_error_is_one_line_without_traceback_and_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mptlike.data", str(tmp_path / "missing.txt"),
         "--out", str(tmp_path / "out"), "--tokenizer", "bytes"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "missing.txt does not exist" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokenizer", "bpe:7"], "bpe:7"),
        (["--tokenizer", "bytes", "--val-fraction", "1.5"], "--val-fraction 1.5"),
        ([], "--tokenizer is required"),
    ],
)
def test_cli_rejects_bad_options_with_one_line(tmp_path, capsys, args, message):
    src = _corpus(tmp_path)
    assert prep_module.main([str(src), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_manifest_round_trips_through_json(folder):
    m = Manifest.load(folder)
    raw = json.loads((folder / "manifest.json").read_text())
    assert m.to_dict() == raw
