"""Initialization statistics against the closed-form std of each scheme."""

import math

import pytest
import torch

from mptlike.model import MPTConfig, MPTForCausalLM


def build(**kw):
    torch.manual_seed(0)
    cfg = MPTConfig(**{"d_model": 4096, "n_heads": 32, "n_layers": 2, "vocab_size": 64, "expansion_ratio": 1, **kw})
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def rel(a, b):
    return abs(a - b) / b


def test_kaiming_normal_std_of_a_4096_wide_layer_and_residual_division():
    model = build()
    block = model.transformer.blocks[0]
    expected = math.sqrt(2.0) / math.sqrt(4096)  # relu gain, fan_in
    assert rel(block.attn.Wqkv.weight.std().item(), expected) < 0.01
    assert rel(block.ffn.up_proj.weight.std().item(), expected) < 0.01
    residual = expected / math.sqrt(2 * 2)
    assert rel(block.attn.out_proj.weight.std().item(), residual) < 0.01
    assert rel(block.ffn.down_proj.weight.std().item(), residual) < 0.01
    assert abs(block.attn.Wqkv.weight.mean().item()) < 1e-4
    assert torch.equal(block.norm_1.weight, torch.ones(4096))


def test_residual_division_can_be_turned_off():
    model = build(init_div_is_residual=False)
    w = model.transformer.blocks[0].attn.out_proj.weight
    assert rel(w.std().item(), math.sqrt(2.0 / 4096)) < 0.01


def test_small_init_and_neox_init():
    small = build(init_name="small_init_")
    std = math.sqrt(2 / (5 * 4096))
    assert rel(small.transformer.blocks[0].attn.Wqkv.weight.std().item(), std) < 0.01
    neox = build(init_name="neox_init_")
    div = 2 / math.sqrt(10)  # n_layers / sqrt(10)
    assert rel(neox.transformer.blocks[0].ffn.down_proj.weight.std().item(), std / div) < 0.01


def test_baseline_and_embedding_options():
    model = build(init_name="baseline_", init_std=0.02, emb_init_std=0.05)
    assert rel(model.transformer.blocks[1].ffn.up_proj.weight.std().item(), 0.02) < 0.01
    assert rel(model.transformer.wte.weight.std().item(), 0.05) < 0.02
    uniform = build(emb_init_uniform_lim=0.1)
    w = uniform.transformer.wte.weight
    assert w.min().item() >= -0.1 and w.max().item() <= 0.1
    assert rel(w.std().item(), 0.1 / math.sqrt(3)) < 0.02


@pytest.mark.parametrize("scheme", ["kaiming_uniform_"])
def test_kaiming_uniform_has_the_kaiming_std(scheme):
    model = build(init_name=scheme)
    w = model.transformer.blocks[0].attn.Wqkv.weight
    assert rel(w.std().item(), math.sqrt(2.0 / 4096)) < 0.01
    bound = math.sqrt(3.0) * math.sqrt(2.0 / 4096)
    assert w.abs().max().item() <= bound * (1 + 1e-6)  # fp32 rounding of the bound
