"""mptlike-convert: bad inputs fail with one line and exit code 2, and nothing is written."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mptlike.cli.convert import main
from mptlike.model import MPTConfig, MPTForCausalLM


class Payload:
    """Any non-tensor object: weights_only loading must refuse to unpickle it."""


def tiny(**overrides) -> MPTForCausalLM:
    torch.manual_seed(0)
    values = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=61)
    values.update(overrides)
    return MPTForCausalLM(MPTConfig(**values))


@pytest.fixture
def hf_dir(tmp_path):
    tiny().save_pretrained(tmp_path / "ours")
    assert main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    return tmp_path / "hf"


def shard_with_index(folder):
    """Re-save folder's weights as two safetensors shards plus an index."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def break_missing_config(folder):
    (folder / "config.json").unlink()


def break_model_type(folder):
    values = json.loads((folder / "config.json").read_text())
    values["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(values))


def break_missing_shard(folder):
    shard_with_index(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()


def break_shape(folder):
    values = json.loads((folder / "config.json").read_text())
    values["d_model"] = 64
    (folder / "config.json").write_text(json.dumps(values))


def break_truncated_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def break_pickled_code(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": Payload()}, folder / "pytorch_model.bin")


def break_no_weights(folder):
    (folder / "model.safetensors").unlink()


CASES = {
    "missing config.json": (break_missing_config, "config.json is missing"),
    "unknown model_type": (break_model_type, "model_type='llama'"),
    "missing shard": (break_missing_shard, "shard model-00002-of-00002.safetensors named in"),
    "wrong tensor shape": (break_shape, "wrong shape"),
    "truncated safetensors": (break_truncated_weights, "not a readable safetensors file"),
    "pickle with code": (break_pickled_code, "weights_only"),
    "no weights": (break_no_weights, "holds no weights"),
}


def assert_one_line_failure(capsys, rc, expected):
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mptlike-convert: error: ") and expected in lines[0]
    assert "Traceback" not in captured.err


def assert_nothing_written(parent, out_name):
    names = [p.name for p in parent.iterdir()]
    assert out_name not in names
    assert not [n for n in names if n.startswith(out_name + ".")], names


@pytest.mark.parametrize("case", list(CASES))
def test_from_hf_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, hf_dir, capsys, case):
    breaker, expected = CASES[case]
    breaker(hf_dir)
    capsys.readouterr()
    rc = main(["from-hf", str(hf_dir), str(tmp_path / "out")])
    assert_one_line_failure(capsys, rc, expected)
    assert_nothing_written(tmp_path, "out")


def test_from_hf_reads_sharded_safetensors_with_index(tmp_path, hf_dir):
    shard_with_index(hf_dir)
    assert main(["from-hf", str(hf_dir), str(tmp_path / "out")]) == 0
    ours = MPTForCausalLM.from_pretrained(tmp_path / "out")
    ref = tiny()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_to_hf_refuses_features_transformers_lacks_in_one_line(tmp_path, capsys):
    tiny(kv_n_heads=2, qk_ln=True, expansion_ratio=3).save_pretrained(tmp_path / "gqa")
    capsys.readouterr()
    rc = main(["to-hf", str(tmp_path / "gqa"), str(tmp_path / "out")])
    expected = "grouped-query attention (kv_n_heads=2, n_heads=4); qk_ln=true; expansion_ratio=3"
    assert_one_line_failure(capsys, rc, expected)
    assert_nothing_written(tmp_path, "out")
    assert main(["to-hf", "--remote-code", str(tmp_path / "gqa"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attn_config"]["attn_type"] == (
        "grouped_query_attention"
    )


def test_existing_output_is_kept_unless_forced(tmp_path, hf_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert_one_line_failure(capsys, main(["from-hf", str(hf_dir), str(out)]), "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["from-hf", "--force", str(hf_dir), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_missing_checkpoint_fails_in_a_fresh_process_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-m", "mptlike.cli.convert", "to-hf", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
