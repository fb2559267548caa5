"""Greedy decoding with our KV cache equals transformers' MptForCausalLM.generate on the exported weights."""

import pytest
import torch

from mptlike.cli.convert import main as convert
from mptlike.model import MPTConfig, MPTForCausalLM

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("d_model,n_heads", [(64, 4), (96, 6)])
def test_greedy_generation_matches_transformers_generate(tmp_path, d_model, n_heads):
    torch.manual_seed(11)
    # A wide init spreads the logits, so greedy choices are not decided by float rounding.
    cfg = MPTConfig(d_model=d_model, n_heads=n_heads, n_layers=2, max_seq_len=64, vocab_size=101,
                    init_name="baseline_", init_std=0.3)
    ours = MPTForCausalLM(cfg).eval()
    ours.save_pretrained(tmp_path / "ours")
    assert convert(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    ref = transformers.MptForCausalLM.from_pretrained(tmp_path / "hf").eval()

    prompt = torch.randint(0, 101, (2, 7))
    expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                            min_new_tokens=24, eos_token_id=None, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=24, temperature=0)
    assert torch.equal(got, expected)
