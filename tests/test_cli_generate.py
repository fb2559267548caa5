"""mptlike-generate: streams the continuation as it is sampled, with the run's own tokenizer."""

import hashlib
import io
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mptlike.cli.convert import main as convert
from mptlike.cli.generate import main
from mptlike.data.manifest import Manifest, ShardInfo
from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.train.config import DataConfig, TrainConfig, config_to_dict

EOS = 256


class RecordingStdout(io.StringIO):
    """Remembers what had been written at every flush, to tell streaming from one write at the end."""

    def __init__(self):
        super().__init__()
        self.snapshots = []

    def flush(self):
        self.snapshots.append(self.getvalue())


@pytest.fixture
def run_dir(tmp_path):
    """A finished run: final/ weights, config.yaml, and a bytes-tokenized data folder."""
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.arange(100, dtype=np.uint16)
    tokens.tofile(data / "val_00000.bin")
    Manifest(tokenizer="bytes", vocab_size=257, eos_id=EOS, dtype="uint16", num_tokens={"val": 100},
             num_documents={"val": 1}, sources=[],
             shards={"val": [ShardInfo("val_00000.bin", 100, hashlib.sha256(tokens.tobytes()).hexdigest())]}
             ).save(data)
    torch.manual_seed(5)
    cfg = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=257,
                    init_name="baseline_", init_std=0.3)
    run = tmp_path / "run"
    MPTForCausalLM(cfg).save_pretrained(run / "final")
    train_cfg = TrainConfig(model=cfg, data=DataConfig(path=str(data)))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config_to_dict(train_cfg)))
    return run


def greedy_reference(model, prompt: bytes, steps: int) -> bytes:
    """Full recomputation every step, no cache; stops at EOS like the command does."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == EOS:
                break
            out.append(token)
    return bytes(out)


def test_greedy_output_streams_token_by_token_and_matches_recomputation(run_dir, monkeypatch):
    model = MPTForCausalLM.from_pretrained(run_dir / "final").eval()
    expected = "def " + greedy_reference(model, b"def ", 20).decode("utf-8", errors="replace") + "\n"
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    rc = main([str(run_dir), "--prompt", "def ", "--max-new-tokens", "20", "--temperature", "0"])
    assert rc == 0
    assert stdout.getvalue() == expected
    # Many flushes, each showing more text than the last: the text appeared while it was sampled.
    distinct = sorted(set(stdout.snapshots), key=len)
    assert len(distinct) >= 4
    assert all(b.startswith(a) for a, b in zip(distinct, distinct[1:]))


def test_same_seed_gives_the_same_sample_from_a_hugging_face_folder(run_dir, tmp_path, capsys):
    assert convert(["to-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    args = ["--prompt", "x", "--max-new-tokens", "16", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3"]
    assert main([str(run_dir / "final"), *args]) == 0
    first = capsys.readouterr().out
    assert main([str(tmp_path / "hf"), *args, "--tokenizer", "bytes"]) == 0
    assert capsys.readouterr().out == first


def test_checkpoint_without_a_known_tokenizer_asks_for_one(tmp_path, capsys):
    MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=257)).save_pretrained(tmp_path / "m")
    assert main([str(tmp_path / "m"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenizer" in err[0] and "Traceback" not in err[0]


def test_a_tokenizer_larger_than_the_model_is_refused_with_one_line(tmp_path, capsys):
    # 257 byte-tokenizer ids, a model of 200: ids 200-256 would index past its embedding.
    MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=200)).save_pretrained(tmp_path / "m")
    assert main([str(tmp_path / "m"), "--tokenizer", "bytes", "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the tokenizer has 257 ids but the model only vocab_size=200" in err[0]


@pytest.mark.parametrize("flag,value", [("--top-p", "0"), ("--temperature", "-1"), ("--top-k", "-2")])
def test_invalid_sampling_settings_fail_with_one_line(run_dir, capsys, flag, value):
    assert main([str(run_dir), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_generation_runs_in_bfloat16_and_streams(run_dir, monkeypatch, capsys):
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main([str(run_dir), "--prompt", "def ", "--max-new-tokens", "16", "--temperature", "0"]) == 0
    assert stdout.getvalue().startswith("def ") and len(set(stdout.snapshots)) >= 2
    assert "cuda bfloat16" in capsys.readouterr().err
