"""The memory estimate (`mptlike-train --estimate-memory`, mptlike.parallel.memory) against measured peaks.

The measured peak is the live tensor storage of a real training step on CPU (tests/memory_helpers.py):
forward with the fused loss, backward, gradient clipping and the optimizer step, on one process and
under FSDP2 over torch's fake process group (every collective a no-op, every buffer real).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from memory_helpers import measure_peak

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel import ParallelPlan, materialize, parallelize, resolve_precision
from mptlike.parallel.memory import estimate_training_memory
from mptlike.train.cli import main
from mptlike.train.config import compose_config, to_train_config
from mptlike.train.optim import build_optimizer
from mptlike.train.plan import build_plan, estimate_memory

TOLERANCE = 0.15
# mpt-tiny's width and vocabulary, shortened so that each measured step takes a moment on 2 cores.
TINY = ["trainer=cpu", "model=mpt-tiny", "model.n_layers=2", "model.max_seq_len=128", "trainer.micro_batch_size=4",
        "trainer.global_batch_size=4"]


def estimate_cli(capsys, *overrides: str) -> dict[str, str]:
    assert main([*overrides, "--estimate-memory"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("peak_memory_gb_per_rank: ")
    return dict(line.split(": ", 1) for line in lines[1:])


def plan_for(*overrides: str):
    return build_plan(to_train_config(compose_config([*overrides, "dry_run=true"])))


def training_step(model, optimizer, batch, *, accumulation: int, autocast: bool, grad_clip: float = 1.0):
    """What the training loop does for one optimizer step (mptlike.train.loop)."""
    inputs, labels = batch

    def step():
        for _ in range(accumulation):
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                loss = model(inputs, labels=labels).loss
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def random_batch(cfg: MPTConfig, micro_batch: int):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.max_seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def measured_steady_state_peak(model, optimizer, batch, **kwargs) -> int:
    step = training_step(model, optimizer, batch, **kwargs)
    step()  # the first step creates the optimizer state; the second is the steady state
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return measure_peak(step, *model.parameters(), *state, *batch)


def test_estimate_memory_prints_the_breakdown_one_key_a_line_ending_with_the_peak(capsys):
    out = estimate_cli(capsys, *TINY)
    for key in ("world_size", "parameters_gb", "gradients_gb", "optimizer_state_gb", "activations_gb",
                "peak_memory_gb_per_rank"):
        assert key in out
    parts = sum(float(out[k]) for k in ("parameters_gb", "gradients_gb", "optimizer_state_gb", "activations_gb"))
    assert float(out["peak_memory_gb_per_rank"]) == pytest.approx(parts, abs=0.02)


def test_estimate_memory_also_runs_as_python_dash_m(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mptlike.train", *TINY, "--estimate-memory"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\npeak_memory_gb_per_rank: \d+\.\d+\n?$", done.stdout)
    assert not any(tmp_path.iterdir())  # nothing written


def test_mpt_7b_on_8_gpus_fits_an_80gb_gpu(capsys):
    out = estimate_cli(capsys, "experiment=mpt-7b", "trainer.devices=8")
    assert out["world_size"] == "8"
    # More than the sharded fp32 weights, gradients and Adam moments alone (16 bytes x 6.65B / 8).
    assert 13.3 < float(out["peak_memory_gb_per_rank"]) < 80


def test_mpt_30b_on_64_gpus_fits_an_80gb_gpu(capsys):
    out = estimate_cli(capsys, "experiment=mpt-30b", "trainer.devices=8", "trainer.num_nodes=8")
    assert out["world_size"] == "64" and out["accumulation_steps"] == "4"
    assert 7.5 < float(out["peak_memory_gb_per_rank"]) < 80


def test_mpt_30b_does_not_fit_when_accumulation_keeps_unsharded_gradients():
    plan = plan_for("experiment=mpt-30b", "trainer.devices=8", "trainer.num_nodes=8")
    kept = ParallelPlan(ac_mode="full", accumulate_unsharded=True)
    estimate = estimate_training_memory(plan.model_config, micro_batch=8, precision=plan.precision, parallel=kept,
                                        world_size=64, accumulation_steps=4)
    assert estimate.peak.gradients > 119e9 and estimate.peak_bytes > 80e9


@pytest.mark.parametrize("extra", [
    pytest.param([], id="fp32"),
    pytest.param(["parallel.activation_checkpointing=full"], id="fp32-checkpointed"),
    pytest.param(["trainer.precision=bf16", "parallel.activation_checkpointing=full"], id="bf16-autocast-checkpointed"),
    # A small vocabulary moves the peak from the loss into a block's backward.
    pytest.param(["model.vocab_size=512", "parallel.activation_checkpointing=full"], id="fp32-small-vocab"),
])
def test_estimate_is_within_15_percent_of_the_peak_measured_on_cpu(extra):
    plan = plan_for(*TINY, *extra)
    cfg, micro_batch = plan.model_config, plan.cfg.trainer.micro_batch_size
    torch.manual_seed(0)
    model = MPTForCausalLM(cfg)
    parallelize(model, plan.parallel)
    o = plan.cfg.optim
    optimizer = build_optimizer(model, name=o.name, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                impl=o.impl, device_type="cpu")
    measured = measured_steady_state_peak(model, optimizer, random_batch(cfg, micro_batch),
                                          accumulation=plan.accumulation_steps, autocast=plan.precision.name == "bf16")
    estimated = estimate_memory(plan).peak_bytes
    assert abs(estimated - measured) <= TOLERANCE * measured, f"estimated {estimated:.4g} B, measured {measured:.4g} B"


def test_fsdp2_estimate_is_within_15_percent_of_the_peak_measured_over_a_fake_process_group():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world, micro_batch, accumulation = 4, 4, 2
    cfg = MPTConfig.from_preset("mpt-tiny", n_layers=2, max_seq_len=128)
    parallel = ParallelPlan(ac_mode="full")
    precision = resolve_precision("bf16", cuda=False, sharded=True)
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DTensor's RNG and FSDP2's view-output notices on CPU
            with torch.device("meta"):
                model = MPTForCausalLM(cfg)
            parallelize(model, parallel, mesh=init_device_mesh("cpu", (world,)), param_dtype=precision.param_dtype,
                        reduce_dtype=precision.reduce_dtype)
            materialize(model, torch.device("cpu"), seed=0, init="sharded")
            optimizer = build_optimizer(model, name="decoupled_adamw", lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                        weight_decay=0.0, device_type="cpu")
            measured = measured_steady_state_peak(model, optimizer, random_batch(cfg, micro_batch),
                                                  accumulation=accumulation, autocast=False)
    finally:
        dist.destroy_process_group()
    estimated = estimate_training_memory(cfg, micro_batch=micro_batch, precision=precision, parallel=parallel,
                                         world_size=world, accumulation_steps=accumulation, device="cpu").peak_bytes
    assert abs(estimated - measured) <= TOLERANCE * measured, f"estimated {estimated:.4g} B, measured {measured:.4g} B"
