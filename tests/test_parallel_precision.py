"""One mix of precisions for one device and for FSDP2: the residual stream is bf16 in both.

bf16 on one device is autocast over fp32 parameters; under FSDP2 it is parameters gathered in bf16
(MixedPrecisionPolicy). Both must run the same arithmetic, or a one-GPU benchmark measures a
different model than the one training runs.
"""

import pytest
import torch
from spawn_helpers import WORLD, spawn

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel import ParallelPlan, materialize, parallelize

CFG = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=64)


def _on_meta():
    with torch.device("meta"):
        return MPTForCausalLM(CFG)


def _residual_dtypes_and_loss(model, ids):
    """The dtype of every block's output (the residual stream after it), and the loss."""
    dtypes = []
    hooks = [block.register_forward_hook(lambda mod, inputs, out: dtypes.append(out[0].dtype))
             for block in model.transformer.blocks]
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    for hook in hooks:
        hook.remove()
    return dtypes, loss.item()


def _ids():
    return torch.randint(0, CFG.vocab_size, (2, CFG.max_seq_len + 1), generator=torch.Generator().manual_seed(2))


def test_one_device_bf16_autocast_runs_a_bf16_residual_stream():
    model = MPTForCausalLM(CFG)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes, _ = _residual_dtypes_and_loss(model, _ids())
    assert dtypes == [torch.bfloat16] * CFG.n_layers
    assert _residual_dtypes_and_loss(model, _ids())[0] == [torch.float32] * CFG.n_layers  # fp32 stays fp32


def _same_mix_check(rank):
    from torch.distributed.device_mesh import init_device_mesh

    sharded = _on_meta()
    parallelize(sharded, ParallelPlan(), mesh=init_device_mesh("cpu", (WORLD,)), param_dtype=torch.bfloat16)
    materialize(sharded, torch.device("cpu"), seed=0, init="rank0", build_full=_on_meta)
    whole = _on_meta()
    materialize(whole, torch.device("cpu"), seed=0)
    fsdp_dtypes, fsdp_loss = _residual_dtypes_and_loss(sharded, _ids())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one_dtypes, one_loss = _residual_dtypes_and_loss(whole, _ids())
    assert fsdp_dtypes == one_dtypes == [torch.bfloat16] * CFG.n_layers, (fsdp_dtypes, one_dtypes)
    assert fsdp_loss == pytest.approx(one_loss, rel=1e-3)


@pytest.mark.slow
def test_fsdp2_bf16_and_one_device_bf16_run_the_same_residual_precision_and_loss(tmp_path):
    spawn(_same_mix_check, tmp_path)


def test_fsdp2_bf16_keeps_the_alibi_slopes_fp32_inside_every_block():
    """FSDP2's MixedPrecisionPolicy would cast the blocks' forward inputs, ALiBi slopes included, to
    bf16 (off by up to 1e-3 at 32 heads, and a fresh copy per layer); it must leave them as given."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mptlike.parallel import resolve_precision

    precision = resolve_precision("bf16", cuda=False, sharded=True)
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        model = _on_meta()
        parallelize(model, ParallelPlan(), mesh=init_device_mesh("cpu", (2,)), param_dtype=precision.param_dtype,
                    reduce_dtype=precision.reduce_dtype)
        materialize(model, torch.device("cpu"), seed=0, init="sharded")
        seen = []
        for block in model.transformer.blocks:
            block.attn.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
        with torch.no_grad():
            model(_ids()[:, :-1])
    finally:
        dist.destroy_process_group()
    assert len(seen) == CFG.n_layers
    assert all(s.dtype == torch.float32 for s in seen)
    assert all(s is seen[0] for s in seen)  # one slopes tensor shared by every layer
