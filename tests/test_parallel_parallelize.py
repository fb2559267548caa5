"""Activation checkpointing, compile and materialization applied from outside the model (one process)."""

import pytest
import torch

from mptlike.errors import MptlikeError
from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel import ParallelPlan, materialize, parallelize, resolve_precision

CFG = MPTConfig(d_model=32, n_heads=4, n_layers=4, max_seq_len=16, vocab_size=64)


def _meta_model():
    with torch.device("meta"):
        return MPTForCausalLM(CFG)


def _plain_model(seed):
    model = _meta_model()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def test_materialize_initializes_every_parameter_from_the_seed_alone():
    a, b = _meta_model(), _meta_model()
    materialize(a, torch.device("cpu"), seed=3)
    torch.manual_seed(999)  # unrelated randomness in between must not matter
    torch.rand(10)
    materialize(b, torch.device("cpu"), seed=3)
    reference = _plain_model(3)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), reference.parameters()):
        assert not p.is_meta
        assert torch.equal(p, q) and torch.equal(p, r), name
    c = _meta_model()
    materialize(c, torch.device("cpu"), seed=4)
    assert not torch.equal(c.transformer.wte.weight, a.transformer.wte.weight)


def test_every_k_checkpointing_wraps_blocks_0_and_2_and_keeps_gradients_and_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    plain = _plain_model(0)
    wrapped = _plain_model(0)
    parallelize(wrapped, ParallelPlan(ac_mode="every_k", ac_every=2))
    kinds = [isinstance(b, CheckpointWrapper) for b in wrapped.transformer.blocks]
    assert kinds == [True, False, True, False]
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (plain, wrapped):
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    assert list(get_model_state_dict(wrapped)) == list(plain.state_dict())
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_full_checkpointing_wraps_every_block_and_compile_keeps_parameter_names():
    model = _meta_model()
    names = [n for n, _ in model.named_parameters()]
    parallelize(model, ParallelPlan(ac_mode="full", compile=True))
    assert all(type(b).__name__ == "CheckpointWrapper" for b in model.transformer.blocks)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model.to_empty(device="cpu")  # torch 2.6/2.7's get_model_state_dict leaves out meta tensors
    assert list(get_model_state_dict(model)) == names


def test_unknown_checkpointing_mode_is_refused():
    with pytest.raises(MptlikeError, match="parallel.activation_checkpointing"):
        ParallelPlan(ac_mode="some")


def test_precision_uses_autocast_on_one_device_and_a_policy_when_sharded():
    single = resolve_precision("bf16", cuda=False, sharded=False)
    assert single.lightning == "bf16-mixed" and single.param_dtype is None
    sharded = resolve_precision("bf16", cuda=False, sharded=True)
    assert sharded.lightning == "32-true"
    assert sharded.param_dtype == torch.bfloat16 and sharded.reduce_dtype == torch.float32
    assert resolve_precision("auto", cuda=False, sharded=True).param_dtype is None  # fp32 on CPU
    with pytest.raises(MptlikeError, match="trainer.precision=fp16"):
        resolve_precision("fp16", cuda=True, sharded=False)


def test_the_models_output_is_a_pytree_that_shows_its_tensors_to_fsdp2():
    # FSDP2 before torch 2.13 (2.11 on the GPU machine) finds the root module's outputs with torch's pytree
    # to all-gather the root's parameters again for backward; an opaque output made backward read the
    # freed storage of the tied head (found by make gpu-check, FSDP2 at world size 8 on an H200).
    from torch.utils._pytree import tree_flatten

    model = _plain_model(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    leaves, _ = tree_flatten(out)
    assert any(leaf is out.loss for leaf in leaves) and any(leaf is out.logits for leaf in leaves)
    assert all(leaf.requires_grad for leaf in leaves if isinstance(leaf, torch.Tensor))
