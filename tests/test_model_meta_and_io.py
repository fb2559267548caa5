"""Meta-device construction, save/load round trip, and corrupt weights."""

import json
import subprocess
import sys

import pytest
import torch

from mptlike.errors import MptlikeError
from mptlike.model import MPTConfig, MPTForCausalLM

META_70B = """
import resource, time, torch
from mptlike.model import MPTConfig, MPTForCausalLM
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
with torch.device("meta"):
    model = MPTForCausalLM(MPTConfig.from_preset("mpt-70b"))
elapsed = time.perf_counter() - t
grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(elapsed, grown_kb, model.num_params())
"""


def test_mpt_70b_builds_on_meta_in_under_5_seconds_and_1_gb():
    out = subprocess.run([sys.executable, "-c", META_70B], capture_output=True, text=True, check=True)
    elapsed, grown_kb, params = out.stdout.split()
    assert float(elapsed) < 5.0
    assert int(grown_kb) < 1_000_000
    assert int(params) > 60e9


def test_save_and_load_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    cfg = MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=50, kv_n_heads=2, qk_ln=True)
    model = MPTForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = MPTForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config == cfg
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=50)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MptlikeError, match="wrong shape"):
        MPTForCausalLM.from_pretrained(tmp_path)


def test_missing_weights_file_is_named(tmp_path):
    MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=50)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(MptlikeError, match="model.safetensors is missing"):
        MPTForCausalLM.from_pretrained(tmp_path)


def test_meta_model_materializes_and_trains_one_step():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=50))
    model.to_empty(device="cpu")
    model.init_weights()
    ids = torch.randint(0, 50, (2, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
