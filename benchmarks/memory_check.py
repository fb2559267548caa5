"""The memory estimate (mptlike.parallel.memory) against the peak CUDA memory of real training steps.

    python benchmarks/memory_check.py --out memory.json          # GPU: the two configs below
    python benchmarks/memory_check.py --cpu --out memory.json    # CPU: tiny shapes, estimate only

Two configs: one device (bf16 autocast over fp32 weights, no checkpointing: mpt-1b's width at seq
2048), and FSDP2 over torch's fake process group at world size 8 (every collective a no-op, every
buffer real: the per-rank memory of an 8-GPU job on one GPU) with a 7B-width slice, full activation
checkpointing and two micro-batches. Each runs two optimizer steps (the first creates the Adam
state) and reports `torch.cuda.max_memory_allocated` of the second next to the estimate. The CPU
run builds and steps the same code with tiny shapes (so this script cannot rot) and reports the
estimate only: CPU has no allocator statistics (tests/test_parallel_memory.py measures CPU peaks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

try:
    import mptlike  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel import ParallelPlan, materialize, parallelize, resolve_precision
from mptlike.parallel.memory import estimate_training_memory
from mptlike.train.optim import build_optimizer


@dataclass(frozen=True)
class Config:
    name: str
    preset: str
    overrides: dict
    micro_batch: int
    world_size: int  # > 1: FSDP2 over the fake process group
    ac_mode: str
    accumulation: int


GPU_CONFIGS = [
    Config("mpt-1b, one GPU, seq 2048, micro-batch 4", "mpt-1b", {"attn_impl": "sdpa"}, 4, 1, "none", 1),
    Config("mpt-7b width, 4 layers, FSDP2 world 8, full AC, seq 2048, micro-batch 8, 2 micro-batches", "mpt-7b",
           {"n_layers": 4, "attn_impl": "sdpa"}, 8, 8, "full", 2),
]
CPU_CONFIGS = [
    Config("mpt-tiny, 2 layers, one device, seq 64", "mpt-tiny", {"n_layers": 2, "max_seq_len": 64}, 2, 1, "none", 1),
    Config("mpt-tiny, 2 layers, FSDP2 world 4, full AC, seq 64", "mpt-tiny", {"n_layers": 2, "max_seq_len": 64},
           2, 4, "full", 2),
]


def run(config: Config, device: torch.device) -> dict:
    cfg = MPTConfig.from_preset(config.preset, **config.overrides)
    parallel = ParallelPlan(ac_mode=config.ac_mode)
    sharded = config.world_size > 1
    precision = resolve_precision("bf16", cuda=device.type == "cuda", sharded=sharded)
    if sharded:
        dist.init_process_group("fake", rank=0, world_size=config.world_size, store=FakeStore())
    try:
        with torch.device("meta"):
            model = MPTForCausalLM(cfg)
        mesh = init_device_mesh(device.type, (config.world_size,)) if sharded else None
        parallelize(model, parallel, mesh=mesh, param_dtype=precision.param_dtype, reduce_dtype=precision.reduce_dtype)
        materialize(model, device, seed=0, init="sharded")
        optimizer = build_optimizer(model, name="decoupled_adamw", lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=0.0, device_type=device.type)
        tokens = torch.randint(0, cfg.vocab_size, (config.micro_batch, cfg.max_seq_len + 1), device=device)
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        autocast = not sharded  # one device: autocast; FSDP2: the mixed-precision policy
        measured = None
        for step in range(2):
            if step == 1 and device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(config.accumulation):
                with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                    loss = model(inputs, labels=labels).loss
                (loss / config.accumulation).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated()
    finally:
        if sharded:
            dist.destroy_process_group()
    estimate = estimate_training_memory(cfg, micro_batch=config.micro_batch, precision=precision, parallel=parallel,
                                        world_size=config.world_size, accumulation_steps=config.accumulation,
                                        device=device.type)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "config": config.name,
        "estimated_gb": estimate.peak_bytes / 1e9,
        "estimated_phase": estimate.peak_phase,
        "measured_gb": None if measured is None else measured / 1e9,
        "ratio": None if measured is None else estimate.peak_bytes / measured,
        "note": "" if measured is not None else "measured on CUDA only (max_memory_allocated)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU, estimate only")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DTensor's RNG and FSDP2's view-output notices
        for config in GPU_CONFIGS if on_gpu else CPU_CONFIGS:
            rows.append(run(config, device))
            r = rows[-1]
            measured = "-" if r["measured_gb"] is None else f"{r['measured_gb']:.2f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            print(f"{r['config']}: estimated {r['estimated_gb']:.2f} GB ({r['estimated_phase']}), measured "
                  f"{measured} GB, estimate/measured {ratio} {r['note']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if on_gpu else "cpu", "rows": rows},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
