"""FSDP2 / HSDP communication volume, its time at stated link bandwidths, and compute time, per optimizer step.

A plan on paper, not a measurement: nothing here talks to a GPU or a network. For an MPT preset, a mesh
(dp_replicate x dp_shard ranks, gpus_per_node of them per node), a global batch, a micro-batch and a
sequence length it computes, per rank and per optimizer step:

* all-gather bytes: FSDP2 gathers every parameter in `param_dtype` (bf16 under bf16,
  mptlike.parallel.precision) before each micro-batch's forward, and again before its backward for the
  modules that resharded after forward. mptlike.parallel.apply_fsdp keeps the last block gathered
  (no re-gather); the root (embeddings, final norm) is passed reshard_after_forward explicitly, which in
  torch 2.13's fully_shard turns off FSDP2's "root stays gathered" heuristic, so it is re-gathered too
  (`root_regather=False` models the heuristic instead: the difference is V*d parameters).
* reduce-scatter bytes: gradients in `reduce_dtype` (fp32 by default) within the shard group, after
  every micro-batch, or once per step with parallel.accumulate_unsharded (mptlike.train.loop).
* all-reduce bytes (HSDP only): the reduce-scattered 1/dp_shard shard, across the dp_replicate groups,
  as often as the reduce-scatter (FSDP2 runs it right after; set_requires_gradient_sync covers both).

Cost model: ring collectives. Over n ranks a buffer of S bytes costs each rank (n-1)/n * S sent (and
received) for all-gather and reduce-scatter, 2(n-1)/n * S for all-reduce. A collective's time is its
per-rank bytes over the slowest link its group crosses: `intra_bw` (NVLink/NVSwitch, per GPU, one
direction) when the group fits in a node, `inter_bw` (the GPU's NIC) otherwise. Latency, NCCL's
protocol overheads and link efficiency below 100% are ignored: times are lower bounds.

Compute: model FLOPs per token 6N + 12 L d seq (mptlike.train.flops) at `mfu` of the datasheet peak;
with full activation checkpointing the forward is run twice, so the GPU does 4/3 of the model's FLOPs
(every_k: 1 + 1/(3k)) and the same hardware efficiency takes that much longer.

Tensor parallelism (`tp`, mptlike.parallel.tensor_parallel; mesh dp_replicate x dp_shard x tp, tp
innermost and within a node): each MPT block all-gathers its normed input over the sequence before
attention and before the MLP and reduce-scatters out_proj's and down_proj's outputs, each a buffer of
micro_batch x seq x d_model elements in the compute dtype (`param_dtype`); backward runs the reverse
(two reduce-scatters, two all-gathers); a checkpointed block's forward runs them again in the recompute.
Outside the blocks: norm_f's output is all-gathered in forward (its backward is a slice), and the cut of
the embedding's output to this rank's tokens all-gathers its gradient in backward. Per rank per step:
    A x (t-1)/t x mb x seq x d x bytes x (8 L + 4 checkpointed blocks + 2)
at `intra_bw` (tp > gpus_per_node is refused). These collectives sit on the compute's critical path
(no async TP), so the step takes max(compute + TP, FSDP comm). The blocks' parameters per rank are
divided by tp (mptlike.parallel.memory.block_parameters_per_rank), so FSDP2 gathers and reduces
embeddings + blocks/tp over its dp_shard group; the shard group spans dp_shard x tp GPUs. The head and
the loss run whole on every TP rank: (tp-1) x 6 V d extra GPU FLOPs per token.

Memory per rank: mptlike.parallel.memory.estimate_training_memory, called as mptlike.train.plan does
(world_size = dp_shard under HSDP, the data-parallel size otherwise; tp).

    .venv/bin/python benchmarks/comm_volume.py --preset mpt-7b --gpus 64 --dp-shard 8 --global-batch 1024
    .venv/bin/python benchmarks/comm_volume.py --preset mpt-70b --gpus 64 128 256 512 --global-batch 2048 --recommend
    .venv/bin/python benchmarks/comm_volume.py --preset mpt-70b --gpus 512 --tp 8 --global-batch 2048 --micro-batch 4
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

try:
    import mptlike  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel.memory import block_parameters_per_rank, estimate_training_memory
from mptlike.parallel.parallelize import ParallelPlan
from mptlike.parallel.precision import resolve_precision
from mptlike.parallel.tensor_parallel import valid_tp_degrees

GB = 1e9
H100_PEAK = 989e12  # dense bf16, H100 SXM datasheet (mptlike.train.flops)
NVLINK_BW = 450e9  # bytes/s per GPU, one direction (H100 SXM NVLink 4: 900 GB/s bidirectional)
IB_BW = 50e9  # bytes/s per GPU: one 400 Gb/s InfiniBand NIC per GPU
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def ring_allgather_factor(n: int) -> float:
    """Fraction of the full buffer each rank sends (and receives) in a ring all-gather or reduce-scatter."""
    return (n - 1) / n


def ring_allreduce_factor(n: int) -> float:
    """Fraction of the buffer each rank sends (and receives) in a ring all-reduce (reduce-scatter + all-gather)."""
    return 2 * (n - 1) / n


@dataclass(frozen=True)
class ModelSizes:
    n_params: int
    n_block: int  # one block's parameters
    n_root: int  # embeddings, final norm, untied head: what the root FSDP module owns
    n_layers: int
    d_model: int
    flops_per_token: int
    vocab: int = 0  # the (tied) head's rows: its matmul is what every TP rank runs whole


@functools.cache
def model_sizes(preset: str, seq_len: int) -> ModelSizes:
    """Parameter counts from the model built on the meta device (nothing allocated)."""
    cfg = MPTConfig.from_preset(preset, max_seq_len=seq_len)
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    n = model.num_params()
    n_block = sum(p.numel() for p in model.transformer.blocks[0].parameters())
    return ModelSizes(n, n_block, n - cfg.n_layers * n_block, cfg.n_layers, cfg.d_model,
                      model.flops_per_token(seq_len), cfg.vocab_size)


@functools.cache
def block_params_per_tp_rank(preset: str, seq_len: int, tp: int) -> float:
    """One block's parameters on one TP rank (mptlike.parallel.memory's own count); the whole block at tp=1."""
    if tp == 1:
        return model_sizes(preset, seq_len).n_block
    return block_parameters_per_rank(MPTConfig.from_preset(preset, max_seq_len=seq_len), tp)


@dataclass(frozen=True)
class Plan:
    preset: str
    gpus: int
    dp_shard: int  # data-parallel ranks that share one copy of the model; dp_replicate = gpus // (dp_shard x tp)
    global_batch: int  # sequences per optimizer step
    micro_batch: int  # sequences per forward/backward per rank
    seq_len: int = 2048
    gpus_per_node: int = 8
    ac_mode: str = "full"  # none | full | every_k
    ac_every: int = 2
    precision: str = "bf16"
    reduce_dtype: str = "fp32"
    reshard_after_forward: bool = True
    accumulate_unsharded: bool = False
    root_regather: bool = True
    intra_bw: float = NVLINK_BW
    inter_bw: float = IB_BW
    peak_flops: float = H100_PEAK
    mfu: float = 0.45
    tp: int = 1  # tensor-parallel ranks per group (innermost mesh dimension, within a node)

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the tp ranks of a group share one micro-batch."""
        return self.gpus // self.tp

    @property
    def dp_replicate(self) -> int:
        return self.gpus // (self.dp_shard * self.tp)

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def validate(self) -> None:
        if self.tp < 1 or self.gpus % self.tp:
            raise ValueError(f"tp={self.tp} does not divide {self.gpus} GPUs")
        if self.tp > self.gpus_per_node:
            raise ValueError(f"tp={self.tp} exceeds {self.gpus_per_node} GPUs per node: a tensor-parallel group "
                             f"must stay on NVLink")
        if self.dp % self.dp_shard:
            raise ValueError(f"dp_shard={self.dp_shard} does not divide {self.dp} data-parallel ranks "
                             f"({self.gpus} GPUs / tp={self.tp})")
        if self.global_batch % (self.dp * self.micro_batch):
            dp = f"{self.gpus} GPUs" if self.tp == 1 else f"{self.dp} data-parallel ranks"
            raise ValueError(f"global batch {self.global_batch} is not a multiple of {dp} x micro-batch "
                             f"{self.micro_batch}")


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    n_params: int
    accumulation: int
    allgather_bytes: float  # per rank per step, sent (= received)
    reduce_scatter_bytes: float
    all_reduce_bytes: float
    allgather_s: float
    reduce_scatter_s: float
    all_reduce_s: float
    compute_s: float
    memory_bytes: float
    peak_phase: str
    tp_bytes: float = 0.0  # tensor parallelism's activation all-gathers and reduce-scatters
    tp_s: float = 0.0

    @property
    def comm_s(self) -> float:
        """FSDP2's collectives one after another (an upper bound on their time: the all-reduce's IB link and
        the all-gather's NVLink could run at once under HSDP). TP's are `tp_s`, not included."""
        return self.allgather_s + self.reduce_scatter_s + self.all_reduce_s

    @property
    def step_s_overlapped(self) -> float:
        """Step time if FSDP2's prefetching hides its collectives behind compute (or the reverse); TP's
        collectives block the next matmul, so they add to compute."""
        return max(self.compute_s + self.tp_s, self.comm_s)

    @property
    def step_s_serial(self) -> float:
        return self.compute_s + self.tp_s + self.comm_s

    @property
    def tokens_per_step_per_gpu(self) -> float:
        return self.plan.global_batch * self.plan.seq_len / self.plan.gpus

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step_per_gpu / self.step_s_overlapped

    @property
    def model_mfu(self) -> float:
        """Model FLOPs (no recomputation) per second per GPU over the peak, at the overlapped step time."""
        sizes = model_sizes(self.plan.preset, self.plan.seq_len)
        return self.tokens_per_s_per_gpu * sizes.flops_per_token / self.plan.peak_flops

    @property
    def tokens_per_s_per_gpu_serial(self) -> float:
        return self.tokens_per_step_per_gpu / self.step_s_serial

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "plan"}
        out.update(asdict(self.plan), dp_replicate=self.plan.dp_replicate, comm_s=self.comm_s,
                   step_s_overlapped=self.step_s_overlapped, tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
                   model_mfu=self.model_mfu)
        return out


def link_bw(group_size: int, spans_nodes: bool, plan: Plan) -> float:
    return plan.inter_bw if spans_nodes and group_size > 1 else plan.intra_bw


def recompute_factor(ac_mode: str, ac_every: int) -> float:
    """GPU FLOPs over model FLOPs: a checkpointed block runs its forward (1/3 of its FLOPs) twice."""
    if ac_mode == "full":
        return 4 / 3
    if ac_mode == "every_k":
        return 1 + 1 / (3 * ac_every)
    return 1.0


def checkpointed_blocks(plan: Plan, n_layers: int) -> int:
    """Blocks whose forward runs again in backward (mptlike.parallel.memory's `checkpointed`)."""
    if plan.ac_mode == "full":
        return n_layers
    if plan.ac_mode == "every_k":
        return sum(1 for i in range(n_layers) if i % plan.ac_every == 0)
    return 0


def collective_bytes(plan: Plan, sizes: ModelSizes) -> tuple[float, float, float]:
    """(all-gather, reduce-scatter, all-reduce) bytes each rank sends per optimizer step for FSDP2/HSDP."""
    s, r = plan.dp_shard, plan.dp_replicate
    p_bytes = DTYPE_BYTES[plan.precision]
    g_bytes = DTYPE_BYTES[plan.reduce_dtype]
    # What one TP rank's FSDP2 units hold: the root whole, the blocks divided by tp.
    n_block = block_params_per_tp_rank(plan.preset, plan.seq_len, plan.tp)
    n_params = sizes.n_root + sizes.n_layers * n_block
    # Elements gathered per micro-batch: everything for forward; for backward, what resharded after forward.
    gathered = n_params
    if plan.reshard_after_forward:
        gathered += (sizes.n_layers - 1) * n_block + (sizes.n_root if plan.root_regather else 0)
    micro = plan.accumulation
    reductions = 1 if plan.accumulate_unsharded else micro
    allgather = micro * ring_allgather_factor(s) * gathered * p_bytes
    reduce_scatter = reductions * ring_allgather_factor(s) * n_params * g_bytes
    all_reduce = reductions * ring_allreduce_factor(r) * (n_params / s) * g_bytes
    return allgather, reduce_scatter, all_reduce


def tp_bytes(plan: Plan, sizes: ModelSizes) -> float:
    """Bytes each rank sends per optimizer step in tensor parallelism's activation collectives."""
    if plan.tp == 1:
        return 0.0
    buffer = plan.micro_batch * plan.seq_len * sizes.d_model * DTYPE_BYTES[plan.precision]
    # Per block 2 AG + 2 RS forward, 2 RS + 2 AG backward, 4 more in a recomputed forward; norm_f's
    # all-gather (forward) and the embedding cut's gradient all-gather (backward).
    per_micro = 8 * sizes.n_layers + 4 * checkpointed_blocks(plan, sizes.n_layers) + 2
    return plan.accumulation * ring_allgather_factor(plan.tp) * buffer * per_micro


def estimate(plan: Plan) -> Estimate:
    plan.validate()
    sizes = model_sizes(plan.preset, plan.seq_len)
    ag, rs, ar = collective_bytes(plan, sizes)
    tp_b = tp_bytes(plan, sizes)
    # tp is the innermost mesh dimension: a shard group's ranks are tp apart, spanning dp_shard x tp GPUs.
    shard_spans = plan.dp_shard * plan.tp > plan.gpus_per_node
    shard_bw = link_bw(plan.dp_shard, shard_spans, plan)
    # The replicate group links rank i of every shard group: other nodes unless a node holds several groups.
    replicate_spans = plan.dp_shard * plan.dp_replicate * plan.tp > plan.gpus_per_node
    replicate_bw = link_bw(plan.dp_replicate, replicate_spans, plan)
    tokens = plan.global_batch * plan.seq_len / plan.gpus
    gpu_flops = tokens * sizes.flops_per_token * recompute_factor(plan.ac_mode, plan.ac_every)
    gpu_flops += tokens * (plan.tp - 1) * 6 * sizes.vocab * sizes.d_model  # the head, whole on every TP rank
    compute = gpu_flops / (plan.mfu * plan.peak_flops)
    mem = per_rank_memory(plan)
    return Estimate(plan, sizes.n_params, plan.accumulation, ag, rs, ar, ag / shard_bw, rs / shard_bw,
                    ar / replicate_bw if ar else 0.0, compute, mem.peak_bytes, mem.peak_phase,
                    tp_b, tp_b / plan.intra_bw)


def per_rank_memory(plan: Plan):
    """mptlike's own estimate (mptlike.parallel.memory), called the way mptlike.train.plan calls it."""
    cfg = MPTConfig.from_preset(plan.preset, max_seq_len=plan.seq_len)
    sharded = plan.gpus > 1
    precision = resolve_precision(plan.precision, cuda=True, sharded=sharded, reduce_dtype=plan.reduce_dtype)
    parallel = ParallelPlan(ac_mode=plan.ac_mode, ac_every=plan.ac_every,
                            reshard_after_forward=plan.reshard_after_forward,
                            accumulate_unsharded=plan.accumulate_unsharded)
    world = plan.dp_shard if plan.dp_replicate > 1 else plan.dp
    return estimate_training_memory(cfg, micro_batch=plan.micro_batch, precision=precision, parallel=parallel,
                                    world_size=world, accumulation_steps=plan.accumulation, device="cuda",
                                    seq_len=plan.seq_len, tp=plan.tp)


def candidate_shards(gpus: int, gpus_per_node: int, tp: int = 1) -> list[int]:
    """FSDP over every data-parallel rank, and HSDP with one or two nodes per shard group."""
    dp = gpus // tp
    out = [dp]
    for nodes in (1, 2):
        s = nodes * gpus_per_node // tp
        if 1 <= s < dp and dp % s == 0 and s not in out:
            out.append(s)
    return out


def candidate_tp(preset: str, gpus: int, gpus_per_node: int) -> list[int]:
    """1, 2, 4, 8 where they fit in a node, divide the GPUs and split the model into whole heads."""
    valid = valid_tp_degrees(MPTConfig.from_preset(preset), gpus)  # what parallel.tp accepts for this model
    return [t for t in (1, 2, 4, 8) if t <= gpus_per_node and t in valid]


def recommend(preset: str, gpus: int, global_batch: int, memory_budget: float = 70 * GB,
              tps: tuple[int, ...] | None = None, **overrides) -> tuple[Estimate | None, list[Estimate]]:
    """The plan with the most tokens/s/GPU (collectives overlapped) whose estimated peak fits `memory_budget`,
    over tensor parallelism (candidate_tp, or `tps`), meshes (candidate_shards), activation checkpointing
    none / full and micro-batches 1..per-rank batch."""
    gpus_per_node = overrides.get("gpus_per_node", 8)
    tried = []
    for tp in (tps if tps is not None else candidate_tp(preset, gpus, gpus_per_node)):
        per_rank = global_batch // (gpus // tp)
        for s in candidate_shards(gpus, gpus_per_node, tp):
            for ac in ("none", "full"):
                for mb in (m for m in (1, 2, 4, 8, 16, 32) if m <= per_rank and per_rank % m == 0):
                    tried.append(estimate(Plan(preset, gpus, s, global_batch, mb, ac_mode=ac, tp=tp, **overrides)))
    fits = [e for e in tried if e.memory_bytes <= memory_budget]
    # Ties (compute-bound plans): prefer the one with the least communication, i.e. the most slack for
    # the overlap to absorb, which is also the largest micro-batch (fewer, bigger kernels).
    best = max(fits, key=lambda e: (round(e.tokens_per_s_per_gpu, 1), -e.comm_s), default=None)
    return best, tried


COLUMNS = ("model", "GPUs", "mesh r x s x t", "AC", "mb x acc", "mem GB", "AG GB", "RS GB", "AR GB",
           "AG s", "RS s", "AR s", "comm s", "TP GB / s", "compute s", "hidden", "tok/s/GPU", "MFU", "serial")


def row(e: Estimate) -> list[str]:
    p = e.plan
    tp = f"{e.tp_bytes / GB:.1f} / {e.tp_s:.2f}" if p.tp > 1 else "-"
    return [p.preset, str(p.gpus), f"{p.dp_replicate} x {p.dp_shard} x {p.tp}", p.ac_mode,
            f"{p.micro_batch} x {e.accumulation}",
            f"{e.memory_bytes / GB:.1f}", f"{e.allgather_bytes / GB:.1f}", f"{e.reduce_scatter_bytes / GB:.1f}",
            f"{e.all_reduce_bytes / GB:.2f}", f"{e.allgather_s:.2f}", f"{e.reduce_scatter_s:.2f}",
            f"{e.all_reduce_s:.2f}", f"{e.comm_s:.2f}", tp, f"{e.compute_s:.2f}",
            "yes" if e.comm_s <= e.compute_s + e.tp_s else "NO", f"{e.tokens_per_s_per_gpu:,.0f}", f"{e.model_mfu:.1%}",
            f"{e.tokens_per_s_per_gpu_serial:,.0f}"]


def table(estimates: list[Estimate]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(e)) + " |" for e in estimates]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="mpt-7b")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8])
    ap.add_argument("--dp-shard", type=int, default=-1,
                    help="data-parallel ranks per shard group; -1: all of them (plain FSDP)")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel ranks per group (at most --gpus-per-node); --recommend tries 1, 2, 4, 8")
    ap.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--ac", choices=("none", "full", "every_k"), default="full")
    ap.add_argument("--ac-every", type=int, default=2)
    ap.add_argument("--precision", choices=tuple(DTYPE_BYTES), default="bf16", help="param_dtype of the all-gather")
    ap.add_argument("--reduce-dtype", choices=tuple(DTYPE_BYTES), default="fp32")
    ap.add_argument("--no-reshard-after-forward", action="store_true")
    ap.add_argument("--accumulate-unsharded", action="store_true")
    ap.add_argument("--root-stays-gathered", action="store_true",
                    help="model FSDP2's root heuristic (root not re-gathered for backward)")
    ap.add_argument("--intra-bw", type=float, default=NVLINK_BW / GB, help="GB/s per GPU inside a node")
    ap.add_argument("--inter-bw", type=float, default=IB_BW / GB, help="GB/s per GPU across nodes")
    ap.add_argument("--peak-tflops", type=float, default=H100_PEAK / 1e12)
    ap.add_argument("--mfu", type=float, default=0.45,
                    help="fraction of the peak reached on the FLOPs the GPU runs (recomputation included); the "
                         "MFU column is the resulting model FLOPs utilization")
    ap.add_argument("--recommend", action="store_true",
                    help="search meshes, AC and micro-batches; print the best plan per GPU count that fits")
    ap.add_argument("--memory-budget", type=float, default=70.0, help="GB per rank for --recommend")
    ap.add_argument("--all", action="store_true", help="with --recommend: print every plan tried")
    args = ap.parse_args(argv)
    common = dict(seq_len=args.seq_len, gpus_per_node=args.gpus_per_node, ac_every=args.ac_every,
                  precision=args.precision, reduce_dtype=args.reduce_dtype,
                  reshard_after_forward=not args.no_reshard_after_forward,
                  accumulate_unsharded=args.accumulate_unsharded, root_regather=not args.root_stays_gathered,
                  intra_bw=args.intra_bw * GB, inter_bw=args.inter_bw * GB, peak_flops=args.peak_tflops * 1e12,
                  mfu=args.mfu)
    rows = []
    try:
        for gpus in args.gpus:
            if args.recommend:
                best, tried = recommend(args.preset, gpus, args.global_batch, args.memory_budget * GB, **common)
                if args.all:
                    rows += tried
                elif best is None:
                    print(f"{args.preset} on {gpus} GPUs: no plan fits {args.memory_budget} GB", file=sys.stderr)
                else:
                    rows.append(best)
            else:
                shard = gpus // args.tp if args.dp_shard == -1 else args.dp_shard
                rows.append(estimate(Plan(args.preset, gpus, shard, args.global_batch, args.micro_batch,
                                          ac_mode=args.ac, tp=args.tp, **common)))
    except ValueError as exc:
        print(f"comm_volume: {exc}", file=sys.stderr)
        return 2
    sizes = model_sizes(args.preset, args.seq_len)
    print(f"{args.preset}: {sizes.n_params:,} parameters, {sizes.flops_per_token:,} model FLOPs/token at seq "
          f"{args.seq_len}; global batch {args.global_batch} x {args.seq_len}; all-gather {args.precision}, "
          f"reduce {args.reduce_dtype}; links {args.intra_bw:g} GB/s intra-node, {args.inter_bw:g} GB/s "
          f"inter-node per GPU; {args.mfu:.0%} of {args.peak_tflops:g} TFLOP/s")
    print("Per rank per optimizer step. GB = 1e9 bytes sent per rank (ring model); s = at the link bandwidth; "
          "comm = FSDP2's AG + RS + AR; TP = tensor parallelism's activation collectives (GB / s), on the critical "
          "path; hidden: comm <= compute + TP; tok/s/GPU and MFU with FSDP2's collectives overlapped, serial: "
          "tok/s/GPU without overlap.")
    print(table(rows))
    print(f"mem GB: mptlike.parallel.memory.estimate_training_memory peak per rank"
          f"{f' (budget {args.memory_budget:g} GB)' if args.recommend else ''}; excludes CUDA context, NCCL "
          f"buffers and fragmentation. Nothing here was measured.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
