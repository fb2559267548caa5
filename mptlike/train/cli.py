"""`mptlike-train` / `python -m mptlike.train`: Hydra overrides in, a trained model out.

Every user error (unknown key, wrong type, bad value, missing data) is one line on stderr and
exit code 2, raised before any process group starts and before anything is written.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence

from mptlike.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE, MptlikeError
from mptlike.train.signals import StoppedBeforeStart

PROG = "mptlike-train"
USAGE = f"""usage: {PROG} [--help] [--cfg] [--dry-run] [--estimate-memory] [GROUP=OPTION ...] [KEY=VALUE ...]

Train an MPT model. With no arguments: the quickstart (mpt-tiny on the default corpus).
Arguments are Hydra overrides of conf/config.yaml, for example
  {PROG} model=mpt-125m trainer.max_steps=2000 optim.lr=3e-4 logger=wandb
  torchrun --nproc_per_node=8 -m mptlike.train experiment=mpt-7b data.path=/data/c4-neox
  {PROG} experiment=mpt-30b trainer.devices=8 trainer.num_nodes=16 --dry-run
  {PROG} trainer=composer   (MosaicML Composer drives the loop; from `make composer-env`'s environment)

options:
  --help      this text, the config groups and the top-level keys
  --cfg       print the composed, resolved config and exit (writes nothing)
  --dry-run   validate, build the model on the meta device, print its size and the batch
              arithmetic for trainer.devices x trainer.num_nodes, and exit (same as dry_run=true)
  --estimate-memory
              print the per-rank peak memory of one training step for this config and world size
              (parameters, gradients, optimizer state, activations) and exit; allocates nothing
"""


def _help_text() -> str:
    from mptlike.train.config import conf_dir

    lines = [USAGE, "config groups (GROUP=OPTION):"]
    root = conf_dir()
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name + '=':12s}{', '.join(options)}")
    lines += [
        "",
        "keys users rely on: run_dir, seed, resume (auto|never|PATH), trainer.max_steps, trainer.devices,",
        "  trainer.num_nodes, trainer.precision, trainer.global_batch_size, trainer.micro_batch_size,",
        "  model.max_seq_len, model.attn_impl, optim.lr, logger.mode, checkpoint.every_n_steps,",
        "  checkpoint.keep_last, eval.every_n_steps. `--cfg` shows every key with its value.",
    ]
    return "\n".join(lines)


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    # Known, harmless noise from running DTensor/FSDP2 on CPU (tests, laptops).
    warnings.filterwarnings("ignore", message=".*DTensor random operators may not have complete support.*")
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*`torch.distributed.reduce_scatter_tensor` is deprecated.*")


def _env_rank() -> int:
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    return int(env.get("LOCAL_RANK", 0))


def _format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def dry_run_report(plan) -> str:
    """Sizes and batch arithmetic from a meta-device build: nothing allocated, nothing written."""
    import torch

    from mptlike.model import MPTForCausalLM
    from mptlike.train.flops import FLOPS_FORMULA

    cfg, mc, world = plan.cfg, plan.model_config, plan.world
    with torch.device("meta"):
        model = MPTForCausalLM(mc)
    params = model.num_params()
    fpt = model.flops_per_token(mc.max_seq_len)
    tokens = plan.tokens_per_step
    # fp32 master weights + fp32 grads + two fp32 Adam moments (Lion: one), sharded over all ranks.
    state_bytes = params * (16 if cfg.optim.name == "decoupled_adamw" else 12)
    lines = [
        f"dry run of {cfg.name}: nothing was allocated or written",
        f"parameters: {params} ({_format_count(params)})",
        f"model: d_model={mc.d_model} n_layers={mc.n_layers} n_heads={mc.n_heads} "
        f"max_seq_len={mc.max_seq_len} vocab_size={mc.vocab_size} attn_impl={mc.attn_impl}",
        f"world_size: {world.world_size} ({world.num_nodes} nodes x {world.devices} devices)",
        f"global_batch_size: {cfg.trainer.global_batch_size} sequences = {tokens} tokens per step",
        f"micro_batch_size: {cfg.trainer.micro_batch_size}",
        f"accumulation_steps: {plan.accumulation_steps}",
        f"max_steps: {cfg.trainer.max_steps} ({_format_count(tokens * cfg.trainer.max_steps)} tokens)",
        f"flops_per_token: {fpt:.4g} ({FLOPS_FORMULA})",
        f"flops_per_step: {fpt * tokens:.4g}",
        f"precision: {plan.precision.name}; activation_checkpointing: {plan.parallel.ac_mode}; "
        f"sharded: {world.world_size > 1}",
        f"params_grads_optimizer_gb_per_rank: {state_bytes / world.world_size / 1e9:.2f} (fp32, sharded; "
        "activations extra)",
    ]
    return "\n".join(lines)


def memory_report(plan) -> str:
    from mptlike.train.plan import estimate_memory

    return (f"memory estimate of {plan.cfg.name}: per rank, one optimizer step; nothing was allocated\n"
            f"{estimate_memory(plan).report()}")


def _summary(result, plan) -> str:
    lines = []
    if result.steps_run == 0:
        lines.append(f"nothing to train: {plan.run_dir} is already at step {result.final_step} "
                     f"(raise trainer.max_steps, or use another run_dir)")
        return "\n".join(lines)
    losses = ""
    if result.first_loss is not None:
        losses = f" | train/loss {result.first_loss:.3f} -> {result.last_loss:.3f}"
    val = ""
    if result.val:
        val = f" | val/loss {result.val['val/loss']:.3f} (perplexity {result.val['val/perplexity']:.1f})"
    lines.append(f"trained steps {plan.start_step + 1}-{result.final_step} in {result.wall_seconds:.1f} s{losses}{val}")
    lines.append(f"run_dir: {plan.run_dir}")
    if result.export_dir is not None:
        lines.append(f"weights: {result.export_dir} (MPTForCausalLM.from_pretrained)")
    if result.sample is not None:
        s = plan.cfg.sample
        lines.append(f"sample (temperature {s.temperature}, top_k {s.top_k}):")
        lines.append(result.sample.rstrip())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(_help_text())
        return 0
    show_cfg = "--cfg" in args
    memory_estimate = False
    overrides = []
    for arg in args:
        if arg == "--cfg":
            continue
        if arg == "--dry-run":
            overrides.append("dry_run=true")
        elif arg == "--estimate-memory":
            memory_estimate = True
            overrides.append("dry_run=true")  # validate as a dry run does: no data, no GPU needed
        elif arg.startswith("-"):
            print(f"{PROG}: error: unknown option {arg}: see {PROG} --help", file=sys.stderr)
            return EXIT_USAGE
        else:
            overrides.append(arg)
    _setup_logging(_env_rank())
    try:
        from mptlike.train.config import compose_config, config_to_dict, to_train_config
        from mptlike.train.plan import build_plan

        cfg = to_train_config(compose_config(overrides))
        if show_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(config_to_dict(cfg)), end="")
            return 0
        plan = build_plan(cfg)
        if memory_estimate:
            print(memory_report(plan))
            return 0
        if cfg.dry_run:
            print(dry_run_report(plan))
            return 0
        from mptlike.train.run import run

        result = run(plan)
    except MptlikeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, StoppedBeforeStart) as exc:
        # A signal before the first step (data preparation, rendezvous, building, loading): nothing was
        # trained, so nothing needed saving; config.yaml is not written before training starts.
        name = getattr(exc, "signal_name", "SIGINT")
        print(f"{PROG}: stopped by {name} before training started: nothing was trained; run the same command "
              "again to start", file=sys.stderr)
        return EXIT_INTERRUPTED
    code = 0
    if result.preempted_by is not None:
        if result.is_rank_zero:
            print(f"{PROG}: preempted at step {result.final_step} ({result.preempted_by}): checkpoint written to "
                  f"{result.checkpoint}; run again with resume=auto", file=sys.stderr)
        code = EXIT_PREEMPTED
    elif result.is_rank_zero:
        print(_summary(result, plan))
    if plan.world.world_size > 1:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End a rank of a multi-process run here, its work done and its process group destroyed.

    Interpreter teardown would destroy what FSDP2 and the device mesh still reference, gloo's worker
    threads among them; now and then one is still joinable, and C++ aborts the process ("terminate
    called without an active exception", exit -6) after a run that succeeded, which torchrun reports
    as a failure. Every file is written and closed by now; flush the streams and leave.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
