"""KV-cache decoding against recomputing the whole sequence every step."""

import pytest
import torch

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.model.generation import sample_next


def greedy_by_recomputation(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("kv_n_heads,attn_impl", [(None, "sdpa"), (2, "torch"), (1, "sdpa")])
def test_kv_cache_greedy_equals_full_recomputation(kv_n_heads, attn_impl):
    torch.manual_seed(0)
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=97, max_seq_len=64,
                    kv_n_heads=kv_n_heads, attn_impl=attn_impl, init_name="baseline_", init_std=0.2)
    model = MPTForCausalLM(cfg).eval()
    prompt = torch.randint(0, 97, (2, 5))
    cached = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(cached, greedy_by_recomputation(model, prompt, 20))


def test_generation_stops_when_every_row_emitted_eos():
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=11)).eval()
    prompt = torch.randint(0, 11, (1, 3))
    first = model.generate(prompt, max_new_tokens=1, temperature=0)[0, -1].item()
    out = model.generate(prompt, max_new_tokens=10, temperature=0, eos_id=first)
    assert out.shape == (1, 4)


def test_top_k_one_is_greedy_and_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    # softmax mass: token 1 ~0.49, token 3 ~0.45; top_p=0.5 keeps tokens 1 and 3 only.
    seen = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert seen == {1, 3}
