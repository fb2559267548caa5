"""`mptlike-train` / `python -m mptlike.train`: Hydra overrides in, a trained model out.

Every user error (unknown key, wrong type, bad value, missing data) is one line on stderr and
exit code 2, raised before any process group starts and before anything is written.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mptlike.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE, MptlikeError
from mptlike.train.signals import StoppedBeforeStart

PROG = "mptlike-train"
USAGE = f"""usage: {PROG} [--help] [--cfg] [--dry-run] [--estimate-memory] [-m] [-cd DIR] [-cn NAME]
                     [GROUP=OPTION ...] [KEY=VALUE ...] [~KEY ...]

Train an MPT model. With no arguments: the quickstart (mpt-tiny on the default corpus).
Arguments are Hydra overrides of conf/config.yaml, for example
  {PROG} model=mpt-125m trainer.max_steps=2000 optim.lr=3e-4 logger=wandb
  torchrun --nproc_per_node=8 -m mptlike.train experiment=mpt-7b data.path=/data/c4-neox
  {PROG} experiment=mpt-30b trainer.devices=8 trainer.num_nodes=16 --dry-run
  {PROG} trainer=composer   (MosaicML Composer drives the loop; from `make composer-env`'s environment)
  {PROG} -m optim.lr=1e-3,3e-4 model=mpt-tiny,mpt-125m run_dir=runs/lr-sweep   (4 jobs)
  {PROG} -cd ~/my-conf model=my-model experiment=my-exp   (~/my-conf/model/my-model.yaml, ...)

options:
  --help      this text, the config groups (with --config-dir's) and the top-level keys
  --cfg       print the composed, resolved config and exit (writes nothing); Hydra's `--cfg job` too
  --dry-run   validate, build the model on the meta device, print its size and the batch
              arithmetic for trainer.devices x trainer.num_nodes, and exit (same as dry_run=true)
  --estimate-memory
              print the per-rank peak memory of one training step for this config and world size
              (parameters, gradients, optimizer state, activations) and exit; allocates nothing
  -m, --multirun
              a sweep: each comma list (KEY=a,b), choice(..), range(..) or glob(..) is swept, and every
              combination runs as its own job, one after another in this process, in ROOT/N (job N).
              ROOT is run_dir= (or hydra.sweep.dir=), by default runs/multirun/DATE/TIME;
              ROOT/multirun.yaml lists each job's overrides, status and exit code. Every job is
              validated before the first starts. Exit 0 when every job succeeded, else the first failed
              job's code; a preempted job (3) stops the sweep, and the same command with the same
              run_dir goes on with it. With --cfg, --dry-run or --estimate-memory: each job's output.
              Refused under torchrun: launch one torchrun per job instead, or use hydra/launcher= below
  -cd DIR, --config-dir DIR
              a folder of your own configs, searched before mptlike's conf/: model=NAME finds
              DIR/model/NAME.yaml, experiment=NAME DIR/experiment/NAME.yaml, and mptlike's options still
              work; a model file states what it changes: keys it leaves out are mpt-tiny's (or put
              `defaults: [mpt-125m]` first in it to build on another preset)
  -cn NAME, --config-name NAME
              the primary config, NAME.yaml from DIR, else from conf/ (default: config). Your own should
              start `defaults: [config, _self_]` (mptlike's config.yaml, then yours) and be named other
              than config.yaml, or list mptlike_schema and every group itself

overrides (Hydra's grammar):
  KEY=VALUE, GROUP=OPTION  set a key, choose a group's option; +KEY=VALUE is the same for schema keys
  ~KEY        reset KEY to the schema's default, whatever the config files set (~KEY=VALUE: only when
              it has VALUE); ~GROUP drops the group's option: ~experiment, or ~model (mpt-tiny's values)
  hydra.searchpath=[file:///abs/dir,pkg://package.module]
              more config folders, searched after conf/ (as Hydra appends them)
  hydra.run.dir=DIR          the same as run_dir=DIR (one run)
  hydra.sweep.dir=DIR        with -m: the same as run_dir=DIR, the sweep root
  hydra/launcher=submitit_slurm (or submitit_local) with -m: each job goes to SLURM through submitit
              (pip install 'mptlike[submitit]'), one SLURM job per sweep job, torchrun on every node when
              trainer.devices x trainer.num_nodes > 1; hydra.launcher.KEY=VALUE sets hydra-submitit-launcher's
              settings (partition, nodes, gpus_per_node, timeout_min, account, ...)
  Refused with exit code 2: any other hydra.* override (hydra.job.chdir, hydra/sweeper=...),
  --info, --hydra-help, --shell-completion (-sc) and --config-path (-cp): {PROG} composes
  with Hydra's compose API and has no Hydra job runtime (output folder, logging);
  --cfg and --help show what --info would.
"""


def _help_text(config_dir: Path | None = None) -> str:
    from mptlike.train.config import config_groups

    lines = [USAGE, "config groups (GROUP=OPTION):"]
    for group, options in config_groups(config_dir=config_dir).items():
        lines.append(f"  {group + '=':12s}{', '.join(options)}")
    lines += [
        "",
        "keys users rely on: run_dir, seed, resume (auto|never|PATH), trainer.max_steps, trainer.devices,",
        "  trainer.num_nodes, trainer.precision, trainer.global_batch_size, trainer.micro_batch_size,",
        "  model.max_seq_len, model.attn_impl, optim.lr, optim.lr_timing, optim.decay_params, logger.mode,",
        "  checkpoint.every_n_steps, checkpoint.keep_last, eval.every_n_steps, eval.tasks (lm-eval tasks),",
        "  parallel.dp_replicate / parallel.dp_shard (HSDP), parallel.tp (tensor parallel),",
        "  parallel.float8 (torchao, sm89+ GPUs), data.sources (data=mixture), debug.profile_steps.",
        "  `--cfg` shows every key with its value.",
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
    # Gathering a tensor-parallel Wqkv whole (checkpoints, export) takes two all-gathers; concatenation is exact.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


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
    from mptlike.parallel.memory import block_parameters_per_rank
    from mptlike.train.flops import FLOPS_FORMULA

    cfg, mc, world = plan.cfg, plan.model_config, plan.world
    with torch.device("meta"):
        model = MPTForCausalLM(mc)
    params = model.num_params()
    fpt = model.flops_per_token(mc.max_seq_len)
    tokens = plan.tokens_per_step
    # fp32 master weights + fp32 grads + two fp32 Adam moments (Lion: one), sharded over dp_shard ranks
    # (and the blocks' matrices split over parallel.tp ranks).
    tp = plan.mesh.tp
    split = mc.n_layers * (block_parameters_per_rank(mc) - block_parameters_per_rank(mc, tp)) if tp > 1 else 0
    state_bytes = (params - split) * (16 if cfg.optim.name == "decoupled_adamw" else 12)
    lines = [
        f"dry run of {cfg.name}: nothing was allocated or written",
        f"parameters: {params} ({_format_count(params)})",
        f"model: d_model={mc.d_model} n_layers={mc.n_layers} n_heads={mc.n_heads} "
        f"max_seq_len={mc.max_seq_len} vocab_size={mc.vocab_size} attn_impl={mc.attn_impl}",
        f"world_size: {world.world_size} ({world.num_nodes} nodes x {world.devices} devices)",
        f"mesh: {plan.mesh.describe()}",
        f"global_batch_size: {cfg.trainer.global_batch_size} sequences = {tokens} tokens per step",
        f"micro_batch_size: {cfg.trainer.micro_batch_size}",
        f"accumulation_steps: {plan.accumulation_steps}",
        f"max_steps: {cfg.trainer.max_steps} ({_format_count(tokens * cfg.trainer.max_steps)} tokens)",
        f"flops_per_token: {fpt:.4g} ({FLOPS_FORMULA})",
        f"flops_per_step: {fpt * tokens:.4g}",
        f"precision: {plan.precision.name}; activation_checkpointing: {plan.parallel.ac_mode}; "
        f"sharded: {world.world_size > 1}"
        + (f"; float8: {plan.parallel.float8_recipe} (torchao)" if plan.parallel.float8 else ""),
        f"params_grads_optimizer_gb_per_rank: {state_bytes / plan.mesh.dp_shard / 1e9:.2f} (fp32, sharded over "
        f"{plan.mesh.dp_shard}{f' and tensor parallel over {tp}' if tp > 1 else ''}; activations extra)",
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


# Hydra's command-line flags that mptlike-train does not offer, and what it offers instead.
_REFUSED_FLAGS = {
    "--info": "Hydra's --info is not offered: `--cfg` prints the composed config and `--help` the config groups "
              "with their options (--config-dir's included)",
    "--hydra-help": "Hydra's --hydra-help is not offered: `--help` describes every option and config group",
    "--shell-completion": "Hydra's shell completion is not offered: `--help` lists the config groups and their "
                          "options, `--cfg` every key",
    "--config-path": "mptlike-train always composes its own conf/: add a folder of yours with --config-dir DIR "
                     "(searched first) and pick a primary config with --config-name NAME",
}
_REFUSED_FLAGS["-sc"] = _REFUSED_FLAGS["--shell-completion"]
_REFUSED_FLAGS["-cp"] = _REFUSED_FLAGS["--config-path"]


@dataclass
class _Args:
    argv: list[str]
    overrides: list[str] = field(default_factory=list)
    help: bool = False
    show_cfg: bool = False
    memory_estimate: bool = False
    multirun: bool = False
    config_dir: Path | None = None
    config_name: str = "config"


def _parse_args(args: list[str]) -> _Args:
    """The command line: flags (Hydra's spellings where they have one) and overrides. MptlikeError if bad."""
    out = _Args(argv=list(args))
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg in ("-h", "--help"):
            out.help = True
        elif arg == "--cfg":
            out.show_cfg = True
            if i < len(args) and args[i] in ("job", "hydra", "all"):  # Hydra's `--cfg job|hydra|all`
                if args[i] != "job":
                    raise MptlikeError(f"--cfg {args[i]}: mptlike-train has no Hydra runtime config to show; "
                                       f"--cfg (or --cfg job) prints the training config")
                i += 1
        elif arg == "--resolve":
            pass  # Hydra's --cfg --resolve: --cfg always prints the config resolved
        elif arg == "--dry-run":
            out.overrides.append("dry_run=true")
        elif arg == "--estimate-memory":
            out.memory_estimate = True
            out.overrides.append("dry_run=true")  # validate as a dry run does: no data, no GPU needed
        elif arg in ("-m", "--multirun"):
            out.multirun = True
        elif arg in ("-cd", "-cn") or flag in ("--config-dir", "--config-name"):
            name = {"-cd": "--config-dir", "-cn": "--config-name"}.get(arg, flag)
            if not eq:
                if i >= len(args) or args[i].startswith("-"):
                    raise MptlikeError(f"{arg} needs a value: {name} {'DIR' if name == '--config-dir' else 'NAME'}")
                inline, i = args[i], i + 1
            if name == "--config-dir":
                folder = Path(inline).expanduser().absolute()
                if not folder.is_dir():
                    raise MptlikeError(f"--config-dir {inline}: no such folder ({folder})")
                out.config_dir = folder
            else:
                out.config_name = inline.removesuffix(".yaml")
        elif flag in _REFUSED_FLAGS:
            raise MptlikeError(f"{arg}: {_REFUSED_FLAGS[flag]}")
        elif arg.startswith("-"):
            raise MptlikeError(f"unknown option {arg}: see {PROG} --help")
        else:
            out.overrides.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.help:
            print(_help_text(args.config_dir))
            return 0
    except MptlikeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(_env_rank())
    try:
        from mptlike.train.config import compose_config, to_train_config, translate_hydra_overrides
        from mptlike.train.launcher import split_launcher
        from mptlike.train.plan import build_plan

        launcher, settings, rest = split_launcher(args.overrides)
        if launcher != "basic" and not args.multirun:
            raise MptlikeError(f"hydra/launcher={launcher} launches the jobs of a sweep: add -m (--multirun)")
        overrides = translate_hydra_overrides(rest, multirun=args.multirun)
        if args.multirun:
            return _multirun(args, overrides, launcher=launcher, launcher_settings=settings)
        cfg = to_train_config(compose_config(overrides, config_dir=args.config_dir, config_name=args.config_name))
        if args.show_cfg:
            print(_config_yaml(cfg), end="")
            return 0
        plan = build_plan(cfg)
    except MptlikeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.memory_estimate or cfg.dry_run:
        print(memory_report(plan) if args.memory_estimate else dry_run_report(plan))
        return 0
    code = _train(plan)
    if plan.world.world_size > 1 and code in (0, EXIT_PREEMPTED):  # the run ended normally: see _exit_now
        _exit_now(code)
    return code


def _config_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    from mptlike.train.config import config_to_dict
    from mptlike.train.redact import redact

    return OmegaConf.to_yaml(redact(config_to_dict(cfg)))


def _train(plan, job: str = "") -> int:
    """Run one planned training; its exit code (0, 2, 3 or 130), its outcome printed. `job` names a
    sweep's job in the messages."""
    from mptlike.train.run import run

    try:
        result = run(plan)
    except MptlikeError as exc:
        print(f"{PROG}: error: {job}{exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, StoppedBeforeStart) as exc:
        # A signal before the first step (data preparation, rendezvous, building, loading): nothing was
        # trained, so nothing needed saving; config.yaml is not written before training starts.
        name = getattr(exc, "signal_name", "SIGINT")
        print(f"{PROG}: {job}stopped by {name} before training started: nothing was trained; run the same "
              "command again to start", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.preempted_by is not None:
        if result.is_rank_zero:
            print(f"{PROG}: {job}preempted at step {result.final_step} ({result.preempted_by}): checkpoint written "
                  f"to {result.checkpoint}; run again with resume=auto", file=sys.stderr)
        return EXIT_PREEMPTED
    if result.is_rank_zero:
        print(_summary(result, plan))
    return 0


def _multirun(args: _Args, overrides: list[str], *, launcher: str = "basic",
              launcher_settings: dict | None = None) -> int:
    """-m: validate every job of the sweep, then print or run them one after another (mptlike.train.multirun),
    or hand them to submitit (hydra/launcher=submitit_slurm|submitit_local, mptlike.train.launcher)."""
    from omegaconf import OmegaConf

    from mptlike.train.config import compose_config, expand_sweep, to_train_config
    from mptlike.train.multirun import MANIFEST, Manifest, default_root, split_sweep_root, status_of
    from mptlike.train.plan import build_plan

    submitted = launcher != "basic"
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise MptlikeError(f"-m/--multirun under torchrun (WORLD_SIZE={world}): a sweep runs its jobs one after "
                           f"another in one process; launch one torchrun per job instead, each with its run_dir=")
    root, overrides = split_sweep_root(overrides)
    root = default_root() if root is None else root
    jobs = expand_sweep(overrides, config_dir=args.config_dir)
    validated = []
    for number, job in enumerate(jobs):
        name = f"job {number} ({job.label()})" if job.swept else f"job {number}"
        try:
            composed = compose_config(job.overrides, config_dir=args.config_dir, config_name=args.config_name)
            OmegaConf.update(composed, "run_dir", f"{root}/{number}", merge=False)
            if submitted:  # checked here as a dry run: the data and GPUs are the cluster's, not this machine's
                OmegaConf.update(composed, "dry_run", True, merge=False)
            cfg = to_train_config(composed)
            plan = None if args.show_cfg else build_plan(cfg)
            if submitted and plan is not None:
                _check_job_fits_launcher(plan, launcher_settings or {})
            if plan is not None and not submitted and not cfg.dry_run and plan.world.world_size > 1:
                raise MptlikeError(
                    f"trainer.devices x trainer.num_nodes = {plan.world.world_size} processes: a sweep runs its jobs "
                    f"one after another in this process; launch one torchrun per job instead")
        except MptlikeError as exc:
            raise MptlikeError(f"{name}: {exc}") from None
        validated.append((name, cfg, plan))
    roots = sorted({str(Path(cfg.run_dir).parent) for _, cfg, _ in validated})
    if len(roots) > 1:
        raise MptlikeError(f"run_dir={root} puts the jobs under different sweep roots ({', '.join(roots[:3])}): "
                           f"give one folder as run_dir= for the sweep")
    if args.show_cfg or (not submitted and all(cfg.dry_run for _, cfg, _ in validated)):
        for name, cfg, plan in validated:
            print(f"# {name}")
            if args.show_cfg:
                print(_config_yaml(cfg), end="")
            else:
                print(memory_report(plan) if args.memory_estimate else dry_run_report(plan))
        return 0
    command = shlex.join([PROG, *args.argv])
    manifest = Manifest(Path(roots[0]), command, jobs, [cfg.run_dir for _, cfg, _ in validated])
    manifest.write()
    if submitted:
        return _submit(args, launcher, launcher_settings or {}, manifest, validated, Path(roots[0]))
    log = logging.getLogger(__name__)
    first_failure, stopped = 0, None
    for number, (name, cfg, plan) in enumerate(validated):
        log.info("sweep %s: %s of %d, run_dir %s", roots[0], name, len(validated), cfg.run_dir)
        manifest.set(number, "running")
        if cfg.dry_run:
            print(f"# {name}\n{dry_run_report(plan)}")
            code = 0
        else:
            code = _train_job(plan, name)
        manifest.set(number, status_of(code), code)
        first_failure = first_failure or code
        if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
            stopped = f"job {number} ({status_of(code)})"
            break
    done = [s["status"] for s in manifest.status]
    counts = ", ".join(f"{done.count(s)} {s}" for s in dict.fromkeys(done))
    print(f"sweep of {len(jobs)} jobs in {roots[0]}: {counts} (each job's overrides and status: "
          f"{Path(roots[0]) / MANIFEST})")
    if stopped is not None:
        print(f"{PROG}: the sweep stopped at {stopped}; run the same command with run_dir={roots[0]} to go on: "
              f"finished jobs have nothing left to train", file=sys.stderr)
    return first_failure


def _check_job_fits_launcher(plan, settings: dict) -> None:
    nodes = int(settings.get("nodes", 1))
    world = plan.world
    if world.num_nodes != nodes:
        raise MptlikeError(f"trainer.num_nodes={world.num_nodes} but hydra.launcher.nodes={nodes}: give both the "
                           f"same number of nodes")
    gpus = settings.get("gpus_per_node")
    if world.devices > 1 and gpus is not None and int(gpus) != world.devices:
        raise MptlikeError(f"trainer.devices={world.devices} but hydra.launcher.gpus_per_node={gpus}: one process per "
                           f"GPU, so give both the same number")


def _submit(args: _Args, launcher: str, settings: dict, manifest, validated, root: Path) -> int:
    """Every job to submitit at once (a job array on SLURM); wait for them; the sweep's exit code."""
    from mptlike.train.launcher import submit_sweep
    from mptlike.train.multirun import status_of

    flags = []
    if args.config_dir is not None:
        flags += ["--config-dir", str(args.config_dir)]
    if args.config_name != "config":
        flags += ["--config-name", str(args.config_name)]
    jobs = [[*flags, *job.overrides, f"run_dir={cfg.run_dir}"] for job, (_, cfg, _) in zip(manifest.jobs, validated)]
    for number in range(len(jobs)):
        manifest.set(number, "submitted")
    codes = submit_sweep(launcher, settings, jobs, root=root, job_name=validated[0][1].name,
                         processes_per_node=[plan.world.devices for _, _, plan in validated])
    for number, code in enumerate(codes):
        manifest.set(number, status_of(code), code)
    done = [s["status"] for s in manifest.status]
    counts = ", ".join(f"{done.count(s)} {s}" for s in dict.fromkeys(done))
    print(f"sweep of {len(jobs)} jobs through {launcher} in {root}: {counts} (each job's overrides and status: "
          f"{root / 'multirun.yaml'}; submitit's logs: {root / '.submitit'})")
    return next((code for code in codes if code), 0)


def _train_job(plan, name: str) -> int:
    """One job of a sweep: as a single run, but an unexpected error fails this job (exit 1), not the sweep."""
    import traceback

    try:
        return _train(plan, f"{name}: ")
    except Exception as exc:  # a bug or an out-of-memory: the other jobs still run
        traceback.print_exc()
        print(f"{PROG}: error: {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


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
