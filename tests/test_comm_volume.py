"""benchmarks/comm_volume.py against numbers worked out by hand (nothing distributed runs here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "comm_volume.py"


def _load():
    spec = importlib.util.spec_from_file_location("comm_volume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["comm_volume"] = module
    spec.loader.exec_module(module)
    return module


cv = _load()

# mpt-tiny: vocab 8192, d_model 256, 4 layers, no biases, tied embeddings, LayerNorm weights only.
V, D, L = 8192, 256, 4
BLOCK = 12 * D * D + 2 * D  # Wqkv 3d^2, out_proj d^2, up 4d^2, down 4d^2; norm_1 and norm_2 weights
ROOT_PARAMS = V * D + D  # the tied embedding and the final norm
N = ROOT_PARAMS + L * BLOCK


def tiny(**kw) -> cv.Plan:
    base = dict(preset="mpt-tiny", gpus=2, dp_shard=2, global_batch=4, micro_batch=1, seq_len=256,
                intra_bw=100e9, inter_bw=10e9, peak_flops=1e15, mfu=0.5, ac_mode="none")
    base.update(kw)
    return cv.Plan(**base)


def test_parameter_count_by_hand():
    assert N == 5_245_184
    sizes = cv.model_sizes("mpt-tiny", 256)
    assert (sizes.n_params, sizes.n_block, sizes.n_root) == (N, BLOCK, ROOT_PARAMS)
    assert sizes.flops_per_token == 6 * N + 12 * L * D * 256


def test_ring_factors():
    assert cv.ring_allgather_factor(1) == 0
    assert cv.ring_allgather_factor(2) == 0.5
    assert cv.ring_allgather_factor(8) == 7 / 8
    assert cv.ring_allreduce_factor(1) == 0
    assert cv.ring_allreduce_factor(2) == 1.0
    assert cv.ring_allreduce_factor(4) == 1.5


def test_two_rank_fsdp_by_hand():
    e = cv.estimate(tiny())
    assert e.accumulation == 2  # 4 sequences / (2 ranks x 1)
    # Per micro-batch: forward gathers all N; backward re-gathers all blocks but the last, and the root.
    gathered = N + (L - 1) * BLOCK + ROOT_PARAMS
    assert e.allgather_bytes == pytest.approx(2 * 0.5 * gathered * 2)  # 2 micro-batches, ring 1/2, bf16
    assert e.reduce_scatter_bytes == pytest.approx(2 * 0.5 * N * 4)  # fp32, every micro-batch
    assert e.all_reduce_bytes == 0 and e.all_reduce_s == 0
    # One node: NVLink bandwidth.
    assert e.allgather_s == pytest.approx(e.allgather_bytes / 100e9)
    assert e.reduce_scatter_s == pytest.approx(e.reduce_scatter_bytes / 100e9)
    tokens_per_gpu = 4 * 256 / 2
    assert e.compute_s == pytest.approx(tokens_per_gpu * (6 * N + 12 * L * D * 256) / (0.5 * 1e15))
    assert e.tokens_per_s_per_gpu == pytest.approx(tokens_per_gpu / max(e.compute_s, e.comm_s))
    assert e.tokens_per_s_per_gpu_serial == pytest.approx(tokens_per_gpu / (e.compute_s + e.comm_s))


def test_reshard_and_accumulation_switches():
    base = cv.estimate(tiny())
    no_reshard = cv.estimate(tiny(reshard_after_forward=False))
    assert no_reshard.allgather_bytes == pytest.approx(2 * 0.5 * N * 2)  # forward only
    root_kept = cv.estimate(tiny(root_regather=False))
    assert base.allgather_bytes - root_kept.allgather_bytes == pytest.approx(2 * 0.5 * ROOT_PARAMS * 2)
    once = cv.estimate(tiny(accumulate_unsharded=True))
    assert once.reduce_scatter_bytes == pytest.approx(base.reduce_scatter_bytes / 2)  # once, not per micro-batch
    assert once.allgather_bytes == base.allgather_bytes  # still gathered every micro-batch
    bf16_reduce = cv.estimate(tiny(reduce_dtype="bf16"))
    assert bf16_reduce.reduce_scatter_bytes == pytest.approx(base.reduce_scatter_bytes / 2)


def test_hsdp_against_fsdp():
    kw = dict(gpus=16, global_batch=32, micro_batch=1, gpus_per_node=8)
    fsdp = cv.estimate(tiny(dp_shard=16, **kw))
    hsdp = cv.estimate(tiny(dp_shard=8, **kw))
    assert hsdp.plan.dp_replicate == 2 and hsdp.accumulation == 2
    # Inside a group of s=8 the reduce-scatter moves 7/8 of the fp32 gradient ...
    assert hsdp.reduce_scatter_bytes == pytest.approx(2 * 7 / 8 * N * 4)
    # ... then the 1/8 shard is all-reduced across r=2 groups: 2(r-1)/r = 1 of it.
    assert hsdp.all_reduce_bytes == pytest.approx(2 * 1.0 * N / 8 * 4)
    assert fsdp.reduce_scatter_bytes == pytest.approx(2 * 15 / 16 * N * 4)
    assert fsdp.all_reduce_bytes == 0
    # Gradient bytes: HSDP's RS + AR = N (one per micro-batch) > FSDP's 15/16 N, but HSDP's RS stays in the node.
    assert hsdp.reduce_scatter_bytes + hsdp.all_reduce_bytes == pytest.approx(2 * N * 4)
    assert hsdp.allgather_bytes == pytest.approx(fsdp.allgather_bytes * (7 / 8) / (15 / 16))
    # Links: HSDP's shard group is one node (NVLink), its all-reduce crosses nodes; FSDP over 16 crosses nodes.
    assert hsdp.reduce_scatter_s == pytest.approx(hsdp.reduce_scatter_bytes / 100e9)
    assert hsdp.all_reduce_s == pytest.approx(hsdp.all_reduce_bytes / 10e9)
    assert fsdp.reduce_scatter_s == pytest.approx(fsdp.reduce_scatter_bytes / 10e9)
    # dp_shard=16 spans two nodes: inter-node bandwidth for its all-gather too.
    two_node = cv.estimate(tiny(dp_shard=16, gpus=32, global_batch=64, micro_batch=1, gpus_per_node=8))
    assert two_node.allgather_s == pytest.approx(two_node.allgather_bytes / 10e9)


def test_recompute_and_memory_come_from_mptlike():
    assert cv.recompute_factor("none", 2) == 1
    assert cv.recompute_factor("full", 2) == pytest.approx(4 / 3)
    assert cv.recompute_factor("every_k", 2) == pytest.approx(1 + 1 / 6)
    plain, full = cv.estimate(tiny()), cv.estimate(tiny(ac_mode="full"))
    assert full.compute_s == pytest.approx(plain.compute_s * 4 / 3)

    from mptlike.model import MPTConfig
    from mptlike.parallel.memory import estimate_training_memory
    from mptlike.parallel.parallelize import ParallelPlan
    from mptlike.parallel.precision import resolve_precision

    precision = resolve_precision("bf16", cuda=True, sharded=True)
    for plan, world in ((tiny(ac_mode="full"), 2), (tiny(gpus=16, dp_shard=8, global_batch=32), 8)):
        direct = estimate_training_memory(
            MPTConfig.from_preset("mpt-tiny", max_seq_len=256), micro_batch=1, precision=precision,
            parallel=ParallelPlan(ac_mode=plan.ac_mode), world_size=world, accumulation_steps=2, device="cuda",
            seq_len=256)
        assert cv.estimate(plan).memory_bytes == direct.peak_bytes


def test_validation_and_recommend():
    with pytest.raises(ValueError, match="multiple"):
        cv.estimate(tiny(global_batch=3))
    with pytest.raises(ValueError, match="divide"):
        cv.estimate(tiny(gpus=16, dp_shard=6, global_batch=32))
    best, tried = cv.recommend("mpt-tiny", 16, 64, seq_len=256, tps=(1,))
    assert best is not None and best in tried
    assert {e.plan.dp_shard for e in tried} == {16, 8}
    assert all(best.tokens_per_s_per_gpu >= e.tokens_per_s_per_gpu for e in tried
               if e.memory_bytes <= 70e9)
    assert best.plan.gpus == 16


def test_cli_prints_a_table():
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "mpt-tiny", "--gpus", "2", "16", "--dp-shard",
                          "2", "--global-batch", "32", "--micro-batch", "1", "--seq-len", "256"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("| mpt-tiny")]
    assert len(lines) == 2
    assert "| 8 x 2 x 1 |" in lines[1]  # 16 GPUs in shard groups of 2: HSDP 8 x 2, no TP
    assert f"{N:,} parameters" in out.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--preset", "mpt-tiny", "--gpus", "2", "--global-batch", "3",
                          "--micro-batch", "1", "--seq-len", "256"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert bad.returncode == 2 and "multiple" in bad.stderr


def test_tp1_reproduces_the_old_numbers():
    # Pinned from the calculator before tensor parallelism (SCALING.md's mpt-70b 512-GPU FSDP row).
    e = cv.estimate(cv.Plan("mpt-70b", 512, 512, 2048, 4, ac_mode="full"))
    assert e.plan.tp == 1 and e.tp_bytes == 0 and e.tp_s == 0
    assert (round(e.allgather_bytes / 1e9, 1), round(e.reduce_scatter_bytes / 1e9, 1)) == (257.2, 258.8)
    assert (round(e.comm_s, 2), round(e.compute_s, 2), round(e.tokens_per_s_per_gpu)) == (10.32, 9.94, 794)
    assert round(e.memory_bytes / 1e9, 1) == 29.5
    # And the tiny model by hand, as in test_two_rank_fsdp_by_hand.
    t = cv.estimate(tiny())
    assert t.allgather_bytes == pytest.approx(2 * 0.5 * (N + (L - 1) * BLOCK + ROOT_PARAMS) * 2)
    assert t.step_s_overlapped == max(t.compute_s, t.comm_s)


def test_tp_volume_by_hand():
    # 16 GPUs on two nodes of 8: tp=4 inside a node, 4 data-parallel ranks (FSDP over all of them).
    plan = tiny(gpus=16, dp_shard=4, tp=4, global_batch=16, micro_batch=2, gpus_per_node=8, ac_mode="full")
    e = cv.estimate(plan)
    assert plan.dp == 4 and plan.dp_replicate == 1 and e.accumulation == 2  # 16 / (4 dp x 2)
    buffer = 2 * 256 * D * 2  # micro-batch x seq x d_model, bf16
    # Per micro-batch: 4 L per forward, 4 L backward, 4 L recomputed (full AC), norm_f + embedding cut.
    count = 4 * L + 4 * L + 4 * L + 2
    assert count == 50
    assert e.tp_bytes == pytest.approx(2 * (3 / 4) * buffer * count)
    assert e.tp_s == pytest.approx(e.tp_bytes / 100e9)  # NVLink: the group is in one node
    plain = cv.estimate(tiny(gpus=16, dp_shard=4, tp=4, global_batch=16, micro_batch=2, gpus_per_node=8))
    assert plain.tp_bytes == pytest.approx(2 * (3 / 4) * buffer * (8 * L + 2))  # no recompute
    # FSDP over 4 dp ranks of one TP rank's share: the matrices /4, the norms and the embedding whole.
    block_tp = 12 * D * D / 4 + 2 * D
    n_tp = ROOT_PARAMS + L * block_tp
    gathered = n_tp + (L - 1) * block_tp + ROOT_PARAMS
    assert e.allgather_bytes == pytest.approx(2 * (3 / 4) * gathered * 2)
    assert e.reduce_scatter_bytes == pytest.approx(2 * (3 / 4) * n_tp * 4)
    # The shard group spans 4 x 4 = 16 GPUs, two nodes: inter-node bandwidth.
    assert e.allgather_s == pytest.approx(e.allgather_bytes / 10e9)
    # Compute: the model's FLOPs (x 4/3 recompute) plus the head run whole on the 3 other TP ranks.
    tokens = 16 * 256 / 16
    flops = tokens * ((6 * N + 12 * L * D * 256) * 4 / 3 + 3 * 6 * V * D)
    assert e.compute_s == pytest.approx(flops / (0.5 * 1e15))
    assert e.step_s_overlapped == pytest.approx(max(e.compute_s + e.tp_s, e.comm_s))
    assert e.step_s_serial == pytest.approx(e.compute_s + e.tp_s + e.comm_s)

    from mptlike.model import MPTConfig
    from mptlike.parallel.memory import estimate_training_memory
    from mptlike.parallel.parallelize import ParallelPlan
    from mptlike.parallel.precision import resolve_precision

    direct = estimate_training_memory(
        MPTConfig.from_preset("mpt-tiny", max_seq_len=256), micro_batch=2,
        precision=resolve_precision("bf16", cuda=True, sharded=True), parallel=ParallelPlan(ac_mode="full"),
        world_size=4, accumulation_steps=2, device="cuda", seq_len=256, tp=4)
    assert e.memory_bytes == direct.peak_bytes


def test_tp_must_fit_a_node_and_recommend_tries_it():
    with pytest.raises(ValueError, match="per node"):
        cv.estimate(tiny(gpus=32, dp_shard=2, tp=16, global_batch=32, gpus_per_node=8))
    with pytest.raises(ValueError, match="divide"):
        cv.estimate(tiny(gpus=16, dp_shard=3, tp=4, global_batch=16, gpus_per_node=8))
    best, tried = cv.recommend("mpt-tiny", 16, 64, seq_len=256)
    assert {e.plan.tp for e in tried} == {1, 2, 4, 8}
    assert cv.candidate_tp("mpt-tiny", 16, 4) == [1, 2, 4]  # never past a node of 4
    assert cv.candidate_tp("mpt-tiny", 12, 8) == [1, 2, 4]  # 8 does not divide 12 GPUs
    assert {(e.plan.dp_shard, e.plan.tp) for e in tried} >= {(16, 1), (8, 1), (2, 4), (4, 4), (8, 2)}
    assert best is not None and best in tried
