"""The config tree: the schema holds every default, conf/ only what an option changes; MPT-7B / MPT-30B
experiments with llm-foundry's published settings, sized for a cluster without allocating."""

import resource
import shutil

import pytest
import yaml
from omegaconf import OmegaConf

from mptlike.train.cli import main
from mptlike.train.config import TrainConfig, compose_config, conf_dir, config_to_dict, to_train_config


def _mpt_params(d, n_layers, vocab, expansion=4):
    """Independent count: tied embedding, per block Wqkv (3d^2) + out_proj (d^2) + FFN (2 e d^2) and
    two LayerNorm weights (no biases), plus the final LayerNorm."""
    per_block = 3 * d * d + d * d + 2 * expansion * d * d + 2 * d
    return vocab * d + n_layers * per_block + d


def _dry_run(capsys, args):
    code = main([*args, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return fields


@pytest.mark.parametrize(
    "experiment, nodes, params, accum",
    [
        ("mpt-7b", 4, _mpt_params(4096, 32, 50432), 1024 // (8 * 8 * 4)),
        ("mpt-30b", 16, _mpt_params(7168, 48, 50432), 2048 // (8 * 8 * 16)),
    ],
)
def test_experiment_dry_run_reports_params_and_accumulation_for_a_cluster_without_allocating(
    capsys, tmp_path, monkeypatch, experiment, nodes, params, accum
):
    monkeypatch.chdir(tmp_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fields = _dry_run(capsys, [f"experiment={experiment}", "trainer.devices=8", f"trainer.num_nodes={nodes}"])
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert int(fields["parameters"].split()[0]) == params
    assert int(fields["accumulation_steps"]) == accum
    assert fields["world_size"].startswith(f"{8 * nodes} ")
    assert grown_kb < 500_000  # fp32 weights alone would be 26 GB / 120 GB
    assert list(tmp_path.iterdir()) == []  # no run_dir, no data folder


@pytest.mark.parametrize(
    "experiment, global_batch, lr, max_steps",
    [("mpt-7b", 1024, 1.2e-4, 63900), ("mpt-30b", 2048, 1.0e-4, 143100)],
)
def test_experiment_uses_llm_foundry_published_settings(experiment, global_batch, lr, max_steps):
    cfg = to_train_config(compose_config([f"experiment={experiment}"]))
    assert cfg.trainer.global_batch_size == global_batch
    assert cfg.trainer.micro_batch_size == 8
    assert cfg.trainer.max_steps == max_steps
    assert cfg.trainer.precision == "bf16"
    assert cfg.optim.name == "decoupled_adamw"
    assert cfg.optim.lr == pytest.approx(lr)
    assert list(cfg.optim.betas) == [0.9, 0.95]
    assert cfg.optim.eps == pytest.approx(1e-8)
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.alpha_f) == ("cosine", 100, pytest.approx(0.1))
    assert cfg.optim.grad_clip == 1.0
    assert cfg.parallel.activation_checkpointing == "full"
    assert cfg.parallel.reshard_after_forward is True
    assert cfg.model.max_seq_len == 2048
    assert cfg.seed == 17


def test_command_line_group_choice_wins_over_the_experiment():
    cfg = to_train_config(compose_config(["experiment=mpt-7b", "model=mpt-1b", "optim.lr=3e-4"]))
    assert cfg.model.d_model == 2048 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.trainer.global_batch_size == 1024


def test_dry_run_refuses_a_cluster_size_that_does_not_divide_the_global_batch(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["experiment=mpt-7b", "trainer.devices=8", "trainer.num_nodes=3", "--dry-run"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "trainer.global_batch_size=1024 is not divisible" in err and "192" in err
    # 24 ranks at micro-batch 8: the world sizes that would work, for an elastic job that lost a node.
    assert "world sizes up to 48 that divide it at micro-batch 8: 1, 2, 4, 8, 16, 32)" in err


def _leaves(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_without_an_experiment_the_composed_config_is_the_schema_defaults():
    """Only the model preset (model=mpt-tiny) and the default corpus (data=stdlib) are chosen by files."""
    composed = _leaves(config_to_dict(to_train_config(compose_config(["~experiment"]))))
    schema = _leaves(config_to_dict(TrainConfig()))
    chosen = {"data.path"} | {k for k in composed if k.startswith("model.")}
    assert {k: v for k, v in composed.items() if k not in chosen} == {
        k: v for k, v in schema.items() if k not in chosen
    }
    assert (composed["trainer.max_steps"], composed["trainer.global_batch_size"]) == (1000, 256)
    assert (composed["optim.lr"], composed["optim.warmup_steps"]) == (6e-4, 100)


def _settings(path):
    """What a conf/ file sets, without its defaults list."""
    return {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}


def _option_files():
    """Each conf/ file that sets keys, and the overrides that select it. model/ holds full presets
    generated from mptlike.model.presets (one table), so it is left out."""
    for path in sorted(conf_dir().rglob("*.yaml")):
        rel = path.relative_to(conf_dir())
        group = rel.parent.as_posix()
        if group == "model" or not _settings(path):
            continue
        selects = {".": [], "experiment": [f"experiment={rel.stem}"]}.get(group, [f"{group}={rel.stem}", "~experiment"])
        yield pytest.param(rel, selects, id=rel.as_posix())


@pytest.mark.parametrize("rel, selects", list(_option_files()))
def test_no_conf_file_sets_a_key_to_what_it_would_be_without_it(tmp_path, rel, selects):
    """A key a file sets must change the composed config: otherwise it repeats the schema's default, the
    option it builds on or a later file, and two places must be edited to change one value."""
    text = (conf_dir() / rel).read_text()
    header = [line for line in text.splitlines() if line.startswith("# @package")]
    defaults = {k: v for k, v in yaml.safe_load(text).items() if k == "defaults"}
    stripped = tmp_path / "conf"
    shutil.copytree(conf_dir(), stripped)
    (stripped / rel).write_text("\n".join(header) + "\n" + (yaml.safe_dump(defaults) if defaults else ""))
    package = "" if header or rel.parent.as_posix() == "." else rel.parent.as_posix().replace("/", ".") + "."
    keys = [package + k for k in _leaves(_settings(conf_dir() / rel))]
    with_file = _leaves(OmegaConf.to_container(compose_config(selects), resolve=False))
    without = _leaves(OmegaConf.to_container(compose_config(selects, stripped), resolve=False))
    repeated = [f"{k}={with_file[k]}" for k in keys if with_file[k] == without[k]]
    assert not repeated, f"conf/{rel} sets {', '.join(repeated)}, which it would be without the file"
