"""Every place a model can come from: save_pretrained, a run's final/, sharded step checkpoints, HF folders."""

import hashlib
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mptlike.cli.convert import main as convert
from mptlike.data.manifest import Manifest, ShardInfo
from mptlike.errors import MptlikeError
from mptlike.integrations.checkpoint_io import read_checkpoint, staged_output
from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.train.checkpoint import COMPLETE, Checkpointer
from mptlike.train.config import DataConfig, TrainConfig, config_to_dict
from mptlike.train.loop import Progress

# Saving a step checkpoint in one process is exactly what these tests mean to do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def tiny(seed=0, **overrides) -> MPTForCausalLM:
    torch.manual_seed(seed)
    values = dict(d_model=48, n_heads=6, n_layers=2, max_seq_len=32, vocab_size=257)
    values.update(overrides)
    return MPTForCausalLM(MPTConfig(**values)).eval()


def write_data(folder, tokenizer="bytes", vocab=257, eos=256, n=200):
    folder.mkdir()
    tokens = np.random.default_rng(0).integers(0, vocab, n).astype(np.uint16)
    tokens.tofile(folder / "val_00000.bin")
    sha = hashlib.sha256(tokens.tobytes()).hexdigest()
    Manifest(tokenizer=tokenizer, vocab_size=vocab, eos_id=eos, dtype="uint16", num_tokens={"val": n},
             num_documents={"val": 1}, shards={"val": [ShardInfo("val_00000.bin", n, sha)]}, sources=[]).save(folder)
    return folder


def make_run(tmp_path, model, data_dir=None):
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(model=model.config, data=DataConfig(path=None if data_dir is None else str(data_dir)))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config_to_dict(cfg)))
    return run


def save_step(run, model, step):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpointer = Checkpointer(run)
    checkpointer.save(step, model, optimizer, {"progress": Progress(step=step)})
    return checkpointer.newest()


def same_weights(a: MPTForCausalLM, b: MPTForCausalLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_step_checkpoint_is_gathered_without_a_process_group(tmp_path):
    model = tiny(kv_n_heads=2, qk_ln=True)
    run = make_run(tmp_path, model)
    step_dir = save_step(run, model, 5)
    ckpt = read_checkpoint(step_dir)
    assert ckpt.kind == "sharded" and ckpt.run_dir == run
    assert ckpt.config == model.config
    assert same_weights(ckpt.model, model)


def test_run_folder_resolves_to_newest_checkpoint_then_to_final(tmp_path):
    old, new, final = tiny(1), tiny(2), tiny(3)
    run = make_run(tmp_path, old)
    save_step(run, old, 5)
    save_step(run, new, 10)
    assert same_weights(read_checkpoint(run).model, new)
    assert same_weights(read_checkpoint(run / "checkpoints").model, new)
    final.save_pretrained(run / "final")
    ckpt = read_checkpoint(run)
    assert ckpt.path == run / "final" and ckpt.run_dir == run
    assert same_weights(ckpt.model, final)


def test_unfinished_step_checkpoint_is_refused(tmp_path):
    model = tiny()
    run = make_run(tmp_path, model)
    step_dir = save_step(run, model, 5)
    (step_dir / COMPLETE).unlink()
    with pytest.raises(MptlikeError, match="unfinished checkpoint"):
        read_checkpoint(step_dir)


def test_run_config_that_disagrees_with_the_shards_is_refused(tmp_path):
    model = tiny()
    run = make_run(tmp_path, tiny(d_model=60))
    step_dir = save_step(run, model, 5)
    with pytest.raises(MptlikeError, match="disagree"):
        read_checkpoint(step_dir)


def test_tokenizer_comes_from_the_run_data_manifest(tmp_path):
    data = write_data(tmp_path / "data")
    model = tiny()
    run = make_run(tmp_path, model, data_dir=data)
    model.save_pretrained(run / "final")
    source = read_checkpoint(run / "final").tokenizer
    assert source.spec == "bytes" and source.data_dir == data and source.eos_id == 256


def test_bpe_tokenizer_is_shipped_with_the_export_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mptlike.data.tokenizer import train_bpe

    texts = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int\n    y: int\n"] * 20
    tok = train_bpe(texts, 300)
    data = write_data(tmp_path / "data", tokenizer="bpe:300", vocab=tok.vocab_size, eos=tok.eos_id)
    tok.save(data / "tokenizer.json")
    model = tiny(vocab_size=320)
    run = make_run(tmp_path, model, data_dir=data)
    model.save_pretrained(run / "final")
    assert convert(["to-hf", str(run), str(tmp_path / "hf")]) == 0

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def norm(p):\n    return p.x"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id


def test_staged_output_leaves_nothing_when_the_block_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_replaces_only_with_force_and_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(MptlikeError, match="--force"):
        with staged_output(out):
            pass
    with pytest.raises(RuntimeError):
        with staged_output(out, force=True):
            raise RuntimeError("interrupted")
    assert (out / "old.txt").read_text() == "old"
    with staged_output(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]
