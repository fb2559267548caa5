"""Gradient accumulation under FSDP2 (2 CPU processes over gloo) against one process.

Each worker builds the same tiny model twice: sharded over the 2 ranks, and whole as one process
would train it. The sharded rank takes 2 of the 4 micro-batches of a global batch; the whole copy
takes all 4. `train_step` must give both the same loss, gradient norm and gradients.
"""

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from spawn_helpers import WORLD, spawn

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel import ParallelPlan, materialize, parallelize
from mptlike.train.loop import train_step

CFG = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=64)
MICRO, ACCUMULATION = 2, 2  # global batch: 2 ranks x 2 micro-batches x 2 sequences
REL = 1e-4


@dataclass
class StandInFabric:
    """What train_step uses of Lightning Fabric: the device, the world size, autocast and backward."""

    world_size: int
    device: torch.device = torch.device("cpu")

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def _never() -> bool:
    return False


def _on_meta():
    with torch.device("meta"):
        return MPTForCausalLM(CFG)


def _global_batch():
    ids = torch.randint(0, CFG.vocab_size, (WORLD * ACCUMULATION * MICRO, CFG.max_seq_len + 1),
                        generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids[i : i + MICRO, :-1], "labels": ids[i : i + MICRO, 1:]}
            for i in range(0, len(ids), MICRO)]


def _micro_batches(batches, model, seen_grads):
    """Yield the micro-batches; before each one after the first, note the sharded gradients' shapes."""
    for i, batch in enumerate(batches):
        if i > 0:
            seen_grads.append({name: None if p.grad is None else tuple(p.grad.to_local().shape)
                               for name, p in model.named_parameters()})
        yield batch


def _avg_as_sum(collective):
    """A reduce-scatter that executes ReduceOp.AVG as a sum, as gloo did under torch 2.6/2.7."""

    def reduce_scatter(*args, **kwargs):
        if kwargs.get("op") == dist.ReduceOp.AVG:
            kwargs["op"] = dist.ReduceOp.SUM
        return collective(*args, **kwargs)

    return reduce_scatter


def _accumulation_check(rank, accumulate_unsharded, avg_sums):
    if avg_sums:  # what torch 2.6/2.7 do anyway; newer torch averages
        for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
            if hasattr(dist, name):
                setattr(dist, name, _avg_as_sum(getattr(dist, name)))
    from torch.distributed.device_mesh import init_device_mesh

    from mptlike.parallel.parallelize import average_gradients_where_avg_sums

    sharded = _on_meta()
    parallelize(sharded, ParallelPlan(), mesh=init_device_mesh("cpu", (WORLD,)))
    if avg_sums:  # the workaround's probe (it also ran inside parallelize) finds the sum
        assert average_gradients_where_avg_sums(sharded)
    materialize(sharded, torch.device("cpu"), seed=0, init="rank0", build_full=_on_meta)
    whole = _on_meta()
    materialize(whole, torch.device("cpu"), seed=0)

    batches = _global_batch()
    mine = batches[rank * ACCUMULATION : (rank + 1) * ACCUMULATION]
    seen: list[dict] = []
    loss, norm, _ = train_step(sharded, _micro_batches(mine, sharded, seen), StandInFabric(WORLD),
                               accumulation=ACCUMULATION, grad_clip=0.0, poisoned=False, stop_requested=_never,
                               **({"accumulate_unsharded": True} if accumulate_unsharded else {}))
    want_loss, want_norm, _ = train_step(whole, iter(batches), StandInFabric(1),
                                         accumulation=WORLD * ACCUMULATION, grad_clip=0.0, poisoned=False,
                                         stop_requested=_never)

    local_shapes = {name: tuple(p.to_local().shape) for name, p in sharded.named_parameters()}
    full_shapes = {name: tuple(p.shape) for name, p in sharded.named_parameters()}
    assert any(local_shapes[n] != full_shapes[n] for n in local_shapes), "nothing is sharded"
    if accumulate_unsharded:
        # Opt-in: no reduce-scatter before the last micro-batch, so no sharded gradient yet.
        assert all(shape is None for shape in seen[0].values()), seen[0]
    else:
        # Default: reduce-scattered after every micro-batch, so each rank holds only its shard.
        assert seen[0] == local_shapes, (seen[0], local_shapes)
    assert loss == pytest.approx(want_loss, rel=REL)
    assert norm == pytest.approx(want_norm, rel=REL)
    for (name, p), q in zip(sharded.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=REL, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp2_accumulation_keeps_gradients_sharded_between_micro_batches_and_matches_one_process(tmp_path):
    spawn(_accumulation_check, tmp_path, False, False)


@pytest.mark.slow
def test_fsdp2_accumulate_unsharded_defers_the_reduce_scatter_and_matches_one_process(tmp_path):
    spawn(_accumulation_check, tmp_path, True, False)


@pytest.mark.slow
def test_fsdp2_gradients_are_the_mean_where_gloo_sums_avg_with_a_reduce_scatter_per_micro_batch(tmp_path):
    # The divide-by-world hook runs after each micro-batch's reduce-scatter, before accumulation.
    spawn(_accumulation_check, tmp_path, False, True)
