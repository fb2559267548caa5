"""mptlike-eval: the reported loss is the mean next-token cross-entropy over every token of the windows."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mptlike.cli.eval import main
from mptlike.data.manifest import Manifest, ShardInfo
from mptlike.model import MPTConfig, MPTForCausalLM

VOCAB = 257


def write_split(folder, tokens: np.ndarray, tokenizer="bytes", shard_tokens=70):
    """A prepared data folder whose val split is `tokens`, cut into several shards."""
    folder.mkdir()
    shards = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        part = tokens[start : start + shard_tokens].astype(np.uint16)
        name = f"val_{i:05d}.bin"
        part.tofile(folder / name)
        shards.append(ShardInfo(name, len(part), hashlib.sha256(part.tobytes()).hexdigest()))
    Manifest(tokenizer=tokenizer, vocab_size=VOCAB, eos_id=256, dtype="uint16", num_tokens={"val": len(tokens)},
             num_documents={"val": 1}, shards={"val": shards}, sources=[]).save(folder)
    return folder


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(2)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    tokens = np.random.default_rng(1).integers(0, VOCAB, 16 * 7 + 5)
    data = write_split(tmp_path / "data", tokens)
    return model, tokens, tmp_path / "ckpt", data


def reference_loss(model, tokens: np.ndarray, seq_len: int, windows: int) -> float:
    """Plain F.cross_entropy over windows tokens[i*S : i*S + S + 1], read straight from the token array."""
    rows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(windows)])
    batch = torch.from_numpy(rows.astype(np.int64))
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits.double()
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).item()


def run_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_loss_equals_direct_cross_entropy_over_all_windows(setup, capsys):
    model, tokens, ckpt, data = setup
    # 7 windows in batches of 3: the last batch is short, so only token weighting gives the right mean.
    result = run_json(capsys, [str(ckpt), "--data", str(data), "--seq-len", "16", "--batch-size", "3"])
    expected = reference_loss(model, tokens, 16, 7)
    assert result["windows"] == 7 and result["tokens"] == 7 * 16
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["tokens_per_sec"] > 0


def test_max_batches_scores_the_first_windows_only(setup, capsys):
    model, tokens, ckpt, data = setup
    result = run_json(capsys, [str(ckpt), "--data", str(data), "--seq-len", "16", "--batch-size", "2",
                               "--max-batches", "2"])
    assert result["windows"] == 4
    assert result["loss"] == pytest.approx(reference_loss(model, tokens, 16, 4), abs=1e-5)


def test_default_window_is_the_model_context(setup, capsys):
    model, tokens, ckpt, data = setup
    result = run_json(capsys, [str(ckpt), "--data", str(data)])
    windows = (len(tokens) - 1) // 64
    assert result["seq_len"] == 64 and result["windows"] == windows
    assert result["loss"] == pytest.approx(reference_loss(model, tokens, 64, windows), abs=1e-5)


def test_table_output_names_loss_perplexity_and_throughput(setup, capsys):
    _, _, ckpt, data = setup
    capsys.readouterr()
    assert main([str(ckpt), "--data", str(data), "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loss ") and "perplexity" in out and "tokens/s" in out


@pytest.mark.parametrize("argv_tail,expected", [
    (["--data", "{tmp}/missing"], "does not exist"),
    (["--data", "{data}", "--split", "train"], "no split 'train'"),
    (["--data", "{data}", "--seq-len", "500"], "fewer than"),
])
def test_bad_data_fails_with_one_line(setup, tmp_path, capsys, argv_tail, expected):
    _, _, ckpt, data = setup
    argv = [a.format(tmp=tmp_path, data=data) for a in argv_tail]
    capsys.readouterr()
    assert main([str(ckpt), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0]


def test_shards_tokenized_unlike_the_training_data_are_refused(setup, tmp_path, capsys):
    from omegaconf import OmegaConf

    from mptlike.train.config import DataConfig, TrainConfig, config_to_dict

    model, tokens, _, data = setup
    run = tmp_path / "run"
    model.save_pretrained(run / "final")
    train_cfg = TrainConfig(model=model.config, data=DataConfig(path=str(data)))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config_to_dict(train_cfg)))
    other = write_split(tmp_path / "other", tokens, tokenizer="bpe:257")
    capsys.readouterr()
    assert main([str(run), "--data", str(other), "--seq-len", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'bytes'" in err[0] and "'bpe:257'" in err[0]


def test_neither_data_nor_tasks_is_one_line(setup, capsys):
    _, _, ckpt, _ = setup
    capsys.readouterr()
    assert main([str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data DATA_DIR" in err[0] and "--tasks" in err[0]


def test_tasks_without_lm_eval_installed_name_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an install without the eval extra looks like
    assert main([str(tmp_path / "run"), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'mptlike[eval]'" in err[0] and "Traceback" not in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_loss_is_close_to_the_fp32_reference(setup, capsys):
    model, tokens, ckpt, data = setup
    result = run_json(capsys, [str(ckpt), "--data", str(data), "--seq-len", "16", "--device", "cuda"])
    assert result["precision"] == "bf16"
    assert result["loss"] == pytest.approx(reference_loss(model, tokens, 16, 7), abs=2e-2)
