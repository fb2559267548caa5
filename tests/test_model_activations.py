"""What a training forward keeps alive: no per-layer key/value tensors unless a KV cache is asked for."""

import weakref

import torch

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel import ParallelPlan, parallelize

CFG = MPTConfig(d_model=32, n_heads=4, n_layers=4, max_seq_len=16, vocab_size=64)


def _live_qkv_at_the_loss(model, **kwargs):
    """How many layers' Wqkv outputs (q, k, v are views of them) are still alive when norm_f runs."""
    projections = []
    for name, module in model.named_modules():
        if name.endswith("attn.Wqkv"):
            module.register_forward_hook(lambda mod, inputs, out: projections.append(weakref.ref(out)))
    alive = []
    model.transformer.norm_f.register_forward_hook(
        lambda mod, inputs, out: alive.append(sum(ref() is not None for ref in projections))
    )
    ids = torch.randint(0, CFG.vocab_size, (2, CFG.max_seq_len), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids, **kwargs)
    assert len(projections) == CFG.n_layers
    return alive[0], out


def test_without_checkpointing_autograd_keeps_every_layers_qkv_for_backward():
    # The probe sees what is held: here attention saved its q, k, v for backward.
    alive, _ = _live_qkv_at_the_loss(MPTForCausalLM(CFG))
    assert alive == CFG.n_layers


def test_checkpointed_blocks_keep_no_qkv_projection_alive_until_the_loss():
    model = parallelize(MPTForCausalLM(CFG), ParallelPlan(ac_mode="full"))
    alive, out = _live_qkv_at_the_loss(model)
    assert alive == 0
    assert out.past_key_values is None


def test_use_cache_returns_every_layers_keys_and_values():
    model = MPTForCausalLM(CFG).eval()
    with torch.no_grad():
        alive, out = _live_qkv_at_the_loss(model, use_cache=True)
    assert alive == CFG.n_layers
    assert len(out.past_key_values) == CFG.n_layers
    k, v = out.past_key_values[0]
    assert k.shape == v.shape == (2, CFG.max_seq_len, CFG.kv_n_heads, CFG.head_dim)
