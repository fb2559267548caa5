"""Our MPT against transformers' MptForCausalLM, the independent reference implementation."""

import pytest
import torch

from mptlike.model import MPTConfig, MPTForCausalLM

transformers = pytest.importorskip("transformers")


def hf_config(cfg: MPTConfig):
    return transformers.MptConfig(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        expansion_ratio=cfg.expansion_ratio,
        max_seq_len=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        layer_norm_epsilon=cfg.norm_eps,
        attn_config={"alibi": True, "alibi_bias_max": cfg.alibi_bias_max},
    )


def hf_twin(model: MPTForCausalLM):
    """transformers' model holding exactly our weights (same names, so a plain state-dict copy)."""
    hf = transformers.MptForCausalLM(hf_config(model.config)).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["lm_head.weight"] or missing == []  # tied to wte
    assert unexpected == []
    assert torch.equal(hf.lm_head.weight, model.transformer.wte.weight)
    return hf


@pytest.mark.parametrize("d_model,n_heads,n_layers", [(64, 4, 2), (96, 6, 3), (120, 12, 2)])
@pytest.mark.parametrize("attn_impl", ["torch", "sdpa"])
def test_logits_match_transformers_mpt(d_model, n_heads, n_layers, attn_impl):
    torch.manual_seed(0)
    cfg = MPTConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, max_seq_len=64, vocab_size=211,
                    attn_impl=attn_impl)
    model = MPTForCausalLM(cfg).eval()
    hf = hf_twin(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        ours = model(ids).logits
        ref = hf(ids).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_loss_matches_transformers_with_shifted_labels():
    torch.manual_seed(1)
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=101)
    model = MPTForCausalLM(cfg).eval()
    hf = hf_twin(model)
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    # transformers shifts inside the model; ours takes targets already aligned with the inputs.
    targets = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1)
    with torch.no_grad():
        ours = model(ids, labels=targets).loss
        ref = hf(ids, labels=ids).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,expected", [("mpt-7b", 6_649_286_656), ("mpt-30b", 29_957_200_896)])
def test_published_presets_have_the_published_parameter_count(name, expected):
    cfg = MPTConfig.from_preset(name)
    with torch.device("meta"):
        ours = MPTForCausalLM(cfg)
        ref = transformers.MptForCausalLM(hf_config(cfg))
    assert ours.num_params() == expected
    assert sum(p.numel() for p in ref.parameters()) == expected
