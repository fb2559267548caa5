"""MPTConfig validation, presets and their yaml twins."""

from pathlib import Path

import pytest
import yaml

from mptlike.errors import MptlikeError
from mptlike.model import PRESETS, MPTConfig, MPTForCausalLM
from mptlike.model.conf_files import preset_yaml

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"d_model": 100, "n_heads": 3}, ["model.d_model=100", "model.n_heads=3", "multiple"]),
        ({"n_heads": 8, "kv_n_heads": 3}, ["model.kv_n_heads=3", "divisor"]),
        ({"n_layers": 0}, ["model.n_layers=0", "positive"]),
        ({"attn_impl": "fast"}, ["model.attn_impl='fast'", "sdpa"]),
        ({"init_name": "xavier"}, ["model.init_name='xavier'", "kaiming_normal_"]),
        ({"attn_pdrop": 1.5}, ["model.attn_pdrop=1.5", "[0, 1)"]),
        ({"logit_scale": "big"}, ["model.logit_scale='big'", "inv_sqrt_d_model"]),
    ],
)
def test_invalid_config_names_key_value_and_fix(overrides, words):
    with pytest.raises(MptlikeError) as err:
        MPTConfig(**{"d_model": 64, "n_heads": 4, **overrides})
    message = str(err.value)
    for word in words:
        assert word in message
    assert "\n" not in message


def test_unknown_key_and_unknown_preset_are_rejected():
    with pytest.raises(MptlikeError, match="model.d_modle"):
        MPTConfig.from_dict({"d_modle": 64})
    with pytest.raises(MptlikeError, match="mpt-8b.*mpt-7b"):
        MPTConfig.from_preset("mpt-8b")


def test_kv_n_heads_defaults_to_multi_head():
    assert MPTConfig(d_model=64, n_heads=4).kv_n_heads == 4


@pytest.mark.parametrize("name", list(PRESETS))
def test_conf_model_yaml_equals_preset(name):
    path = CONF_MODEL / f"{name}.yaml"
    regenerate = "regenerate: python -m mptlike.model.conf_files --write-conf conf/model"
    assert path.read_text() == preset_yaml(name), regenerate
    assert MPTConfig.from_dict(yaml.safe_load(path.read_text())) == MPTConfig.from_preset(name)


def test_every_preset_file_is_a_preset():
    assert sorted(p.stem for p in CONF_MODEL.glob("*.yaml")) == sorted(PRESETS)


def test_tiny_preset_has_a_few_million_parameters():
    import torch

    with torch.device("meta"):
        n = MPTForCausalLM(MPTConfig.from_preset("mpt-tiny")).num_params()
    assert 1_000_000 < n < 10_000_000


def test_parameter_names_follow_mpt_convention_and_have_no_biases():
    import torch

    with torch.device("meta"):
        model = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=50))
    names = set(dict(model.named_parameters()))
    assert names == {
        "transformer.wte.weight",
        "transformer.norm_f.weight",
        *(
            f"transformer.blocks.{i}.{p}.weight"
            for i in range(2)
            for p in ("norm_1", "attn.Wqkv", "attn.out_proj", "norm_2", "ffn.up_proj", "ffn.down_proj")
        ),
    }


def test_flops_per_token_formula():
    import torch

    cfg = MPTConfig.from_preset("mpt-7b")
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    assert model.flops_per_token(2048) == 6 * 6_649_286_656 + 12 * 32 * 4096 * 2048
