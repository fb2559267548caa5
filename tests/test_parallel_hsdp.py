"""The data-parallel mesh from the config: HSDP 2x2 on 4 CPU processes (gloo) against one process,
checkpoints that resume across layouts, invalid meshes refused before any process starts, the profiler."""

import contextlib
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_helpers import assert_close_per_step as assert_close
from train_helpers import losses, make_corpus, torchrun
from train_helpers import sharded_args as tiny_args

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel import MeshPlan, ParallelPlan, build_mesh, materialize, parallelize, resolve_mesh
from mptlike.train.cli import main

REL = 1e-4
HSDP = ("parallel.dp_replicate=2", "parallel.dp_shard=2")
PROFILE = (2, 3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def after(metrics, step):
    return {s: v for s, v in metrics.items() if s > step}


def step3(run_dir):
    return run_dir / "checkpoints" / "step-0000003"


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    assert main(tiny_args(corpus, run_dir)) == 0
    return run_dir


@pytest.fixture(scope="module")
def hsdp(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hsdp") / "run"
    torchrun(tiny_args(corpus, run_dir, *HSDP, f"debug.profile_steps=[{PROFILE[0]},{PROFILE[1]}]"), nproc=4)
    return run_dir


@pytest.mark.slow
def test_hsdp_2x2_gives_the_same_losses_and_gradient_norms_as_one_process(one_process, hsdp):
    assert_close(losses(hsdp), losses(one_process))
    # Adam hides a gradient scale in the losses; the pre-clipping norm (reduced over both mesh dims) shows it.
    assert_close(losses(hsdp, "train/grad_norm"), losses(one_process, "train/grad_norm"))
    assert_close(losses(hsdp, "val/loss"), losses(one_process, "val/loss"))


@pytest.mark.slow
def test_hsdp_checkpoint_holds_one_file_per_rank(hsdp):
    ckpt = step3(hsdp)
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    assert json.loads((ckpt / "train_state.json").read_text())["world_size"] == 4


@pytest.mark.slow
def test_fsdp_on_4_ranks_resumes_an_hsdp_checkpoint(corpus, hsdp, tmp_path):
    run_dir = tmp_path / "fsdp4"
    torchrun(tiny_args(corpus, run_dir, "parallel.dp_shard=4", f"resume={step3(hsdp)}"), nproc=4)
    # Within REL, not bit-exact: one reduce-scatter over 4 ranks adds the gradients in another order than
    # HSDP's reduce-scatter over 2 followed by an all-reduce over 2.
    assert_close(losses(run_dir), after(losses(hsdp), 3))
    assert_close(losses(run_dir, "train/grad_norm"), after(losses(hsdp, "train/grad_norm"), 3))


@pytest.mark.slow
def test_one_process_resumes_an_hsdp_checkpoint(corpus, hsdp, tmp_path):
    run_dir = tmp_path / "one"
    assert main(tiny_args(corpus, run_dir, f"resume={step3(hsdp)}")) == 0
    # Within REL: one process sums its 4 micro-batches' gradients in another order than the mesh does.
    assert_close(losses(run_dir), after(losses(hsdp), 3))


@pytest.mark.slow
def test_hsdp_resumes_its_own_checkpoint_bit_exactly(corpus, hsdp, tmp_path):
    run_dir = tmp_path / "again"
    torchrun(tiny_args(corpus, run_dir, *HSDP, f"resume={step3(hsdp)}"), nproc=4)
    # Same mesh, same reduction order: weights, moments, RNG and data position come back exactly.
    assert losses(run_dir) == after(losses(hsdp), 3)
    assert losses(run_dir, "train/grad_norm") == after(losses(hsdp, "train/grad_norm"), 3)


@pytest.mark.slow
def test_profiler_writes_a_chrome_trace_of_the_requested_steps_on_every_rank(hsdp):
    for rank in range(4):
        trace = hsdp / "profile" / f"rank{rank}" / f"trace-steps{PROFILE[0]}-{PROFILE[1]}.json"
        events = json.loads(trace.read_text())["traceEvents"]
        steps = {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")}
        assert steps == {f"ProfilerStep#{s}" for s in range(PROFILE[0], PROFILE[1] + 1)}, (rank, steps)
        # The step's collectives and the optimizer run inside the trace.
        names = {str(e.get("name", "")) for e in events}
        assert any("Optimizer.step" in n for n in names), rank
    assert sorted(p.name for p in (hsdp / "profile").iterdir()) == [f"rank{r}" for r in range(4)]


@pytest.mark.parametrize(
    ("world", "overrides", "words"),
    [
        (4, ["parallel.dp_replicate=3"], "does not divide the world size 4"),
        (4, ["parallel.dp_replicate=2", "parallel.dp_shard=3"], "2 x 3 = 6 but the world size"),
        (4, ["parallel.dp_replicate=1", "parallel.dp_shard=2"], "1 x 2 = 2 but the world size"),
        (1, ["parallel.dp_replicate=2"], "does not divide the world size 1"),
        (4, ["parallel.dp_replicate=0"], "parallel.dp_replicate=0 is invalid"),
        (4, ["parallel.dp_replicate=-2"], "parallel.dp_replicate=-2 is invalid"),
        (4, ["parallel.dp_shard=0"], "parallel.dp_shard=0 is invalid"),
        (4, ["parallel.dp_shard=-3"], "parallel.dp_shard=-3 is invalid"),
        (1, ["debug.profile_steps=[3,2]"], "debug.profile_steps=[3, 2] is invalid"),
        (1, ["debug.profile_steps=[5,7]"], "trainer.max_steps=6"),
        (1, ["debug.profile_steps=[0,1]"], "1 <= a <= b"),
        (1, ["debug.profile_steps=[2]"], "use [a,b]"),
    ],
)
def test_invalid_mesh_or_profile_steps_fail_with_one_line_before_any_process_starts(
        corpus, tmp_path, capsys, world, overrides, words):
    run_dir = tmp_path / "run"
    assert main(tiny_args(corpus, run_dir, f"trainer.devices={world}", *overrides)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (dist.is_available() and dist.is_initialized())
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ((), "mesh: dp_replicate=1 x dp_shard=4 (FSDP2: every parameter sharded over all 4 ranks)"),
        (HSDP, "mesh: dp_replicate=2 x dp_shard=2 (HSDP: shard within a group of 2, replicate across 2 groups)"),
        (("parallel.dp_replicate=4",), "mesh: dp_replicate=4 x dp_shard=1 (HSDP with groups of 1"),
    ],
)
def test_dry_run_prints_the_mesh(tmp_path, capsys, overrides, line):
    args = ["trainer=cpu", "trainer.devices=4", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
            f"run_dir={tmp_path / 'run'}", *overrides, "--dry-run"]
    assert main(args) == 0
    assert line in capsys.readouterr().out


def test_resolve_mesh_fills_in_the_rest_of_the_world():
    assert resolve_mesh(1, -1, 8) == MeshPlan(1, 8)
    assert resolve_mesh(2, -1, 8) == MeshPlan(2, 4)
    assert resolve_mesh(8, 1, 8) == MeshPlan(8, 1)
    assert resolve_mesh(1, -1, 1) == MeshPlan(1, 1) and not MeshPlan(1, 1).hsdp


# In-process: the mesh build_mesh makes and what fully_shard does with it, on 4 gloo ranks.
CFG = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=64)


class _Fabric:
    world_size, device = 4, torch.device("cpu")

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def _as_sum(collective):
    """A collective that executes ReduceOp.AVG as a sum, as gloo did under torch 2.6/2.7."""

    def reduce(*args, **kwargs):
        if kwargs.get("op") == dist.ReduceOp.AVG:
            kwargs["op"] = dist.ReduceOp.SUM
        return collective(*args, **kwargs)

    return reduce


def _hsdp_check(rank, init_file, avg_sums):
    from torch.distributed.tensor import Replicate, Shard

    from mptlike.parallel.parallelize import average_gradients_where_avg_sums
    from mptlike.train.loop import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    if avg_sums:
        for name in ("reduce_scatter_tensor", "reduce_scatter_single", "all_reduce"):
            if hasattr(dist, name):
                setattr(dist, name, _as_sum(getattr(dist, name)))
    mesh = build_mesh(MeshPlan(2, 2), "cpu")
    assert mesh.mesh_dim_names == ("dp_replicate", "dp_shard")
    # Ranks 0,1 and 2,3 each hold one copy, sharded in two; 0,2 and 1,3 hold the same shard.
    assert mesh["dp_shard"].mesh.tolist() == [[0, 1], [2, 3]][rank // 2]
    with torch.device("meta"):
        sharded = MPTForCausalLM(CFG)
    parallelize(sharded, ParallelPlan(), mesh=mesh)
    assert average_gradients_where_avg_sums(sharded, mesh) is avg_sums
    materialize(sharded, torch.device("cpu"), seed=0, init="rank0",
                build_full=lambda: MPTForCausalLM(CFG).to("meta"))
    whole = MPTForCausalLM(CFG)
    materialize(whole, torch.device("cpu"), seed=0)
    for name, param in sharded.named_parameters():
        assert param.placements == (Replicate(), Shard(0)), (name, param.placements)
    ids = torch.randint(0, CFG.vocab_size, (8, CFG.max_seq_len + 1), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[i:i + 2, :-1], "labels": ids[i:i + 2, 1:]} for i in range(0, 8, 2)]
    loss, norm, _ = train_step(sharded, iter(batches[rank:rank + 1]), _Fabric(), accumulation=1, grad_clip=0.0,
                               poisoned=False, stop_requested=lambda: False)
    want_loss, want_norm, _ = train_step(whole, iter(batches), _Fabric(), accumulation=4, grad_clip=0.0,
                                         poisoned=False, stop_requested=lambda: False)
    assert loss == pytest.approx(want_loss, rel=REL) and norm == pytest.approx(want_norm, rel=REL)
    for (name, p), q in zip(sharded.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=REL, atol=1e-6, msg=name)
    del sharded, whole
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown under live gloo threads (as tests/spawn_helpers.py)


@pytest.mark.slow
@pytest.mark.parametrize("avg_sums", [False, True], ids=["avg", "gloo-avg-sums"])
def test_hsdp_mesh_replicates_then_shards_and_gradients_are_the_mean(tmp_path, avg_sums):
    # With avg_sums both of HSDP's collectives sum (torch 2.6/2.7 on gloo): the probes find 2 x 2.
    mp.spawn(_hsdp_check, args=(str(tmp_path / "init"), avg_sums), nprocs=4, join=True)
