"""Validate a composed config into a RunPlan, before any process group starts or any file is written.

Every check that can fail because of user input lives here, so a bad run fails in a second with
one sentence instead of after minutes of startup on many nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mptlike.errors import MptlikeError, short_error
from mptlike.model import MPTConfig
from mptlike.parallel import MeshPlan, ParallelPlan, PrecisionPlan, resolve_mesh, resolve_precision
from mptlike.parallel.float8 import check_float8
from mptlike.parallel.tensor_parallel import check_tensor_parallel
from mptlike.train.checkpoint import checkpoint_step, read_train_state, resolve_resume
from mptlike.train.config import TrainConfig, config_to_dict
from mptlike.train.layout import CONFIG
from mptlike.train.optim import check_optimizer_args
from mptlike.train.schedule import Schedule
from mptlike.train.tasks import check_tasks, check_tasks_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldInfo:
    world_size: int
    devices: int  # processes per node
    num_nodes: int
    rank: int  # this process's global rank as the environment tells it (0 before a launcher forks)
    external: bool  # processes were started by torchrun (or another elastic launcher)


def detect_world(devices: int, num_nodes: int) -> WorldInfo:
    """torchrun's environment wins over trainer.devices / trainer.num_nodes."""
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")):
        world = int(env["WORLD_SIZE"])
        local = int(env["LOCAL_WORLD_SIZE"])
        return WorldInfo(world, local, max(1, world // local), int(env["RANK"]), True)
    # Children that Lightning's own launcher forks carry LOCAL_RANK / NODE_RANK.
    rank = int(env.get("NODE_RANK", 0)) * devices + int(env.get("LOCAL_RANK", 0))
    return WorldInfo(devices * num_nodes, devices, num_nodes, rank, False)


@dataclass
class DataPlan:
    path: Path
    is_default_corpus: bool
    needs_prepare: bool
    vocab_size: int | None  # of the tokenizer, when the folder exists
    # data.sources validated (mptlike.data.mixture.SourceSpec); `path` is then the first source's folder
    sources: list[Any] | None = None


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, validated; frozen once built (a step that changes it makes a new one)."""

    cfg: TrainConfig
    config_dict: dict[str, Any]
    model_config: MPTConfig
    world: WorldInfo
    accelerator: str  # cpu | gpu
    accumulation_steps: int
    precision: PrecisionPlan
    parallel: ParallelPlan
    schedule: Schedule
    data: DataPlan | None
    resume_from: Path | None
    start_step: int
    init_from: Path | None = None
    mesh: MeshPlan = MeshPlan()  # dp_replicate x dp_shard, their product the world size

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def identity(self) -> dict[str, Any]:
        """What every checkpoint of this run records and a resume must match (see run_identity)."""
        return run_identity(self.cfg, self.data.path if self.data is not None else None)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.trainer.global_batch_size * self.model_config.max_seq_len


def _positive(key: str, value: int, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise MptlikeError(f"{key}={value} is invalid: use a {'non-negative' if zero_ok else 'positive'} integer")


def _non_negative(key: str, value: float, fix: str) -> None:
    if value < 0:
        raise MptlikeError(f"{key}={value} is invalid: {fix}")


def _accelerator(requested: str, dry_run: bool) -> str:
    """cpu or gpu: what trainer.accelerator (auto, cpu or gpu, a schema choice) means on this machine."""
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available() and not dry_run:
        raise MptlikeError(
            "trainer.accelerator=gpu but no CUDA device is visible: use trainer=cpu (or trainer.accelerator=auto)"
        )
    return str(requested)


def _check_profile_steps(steps: list[int] | None, max_steps: int) -> None:
    if steps is None:
        return
    steps = list(steps)
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1] <= max_steps:
        raise MptlikeError(f"debug.profile_steps={steps} is invalid: use [a,b] with 1 <= a <= b <= trainer.max_steps="
                           f"{max_steps}, e.g. debug.profile_steps=[{min(2, max_steps)},{min(3, max_steps)}]")


def _check_batch(global_batch: int, micro_batch: int, world: WorldInfo, tp: int = 1) -> int:
    """Micro-batches per step on each data-parallel rank; the tp ranks of a tensor-parallel group share theirs."""
    _positive("trainer.global_batch_size", global_batch)
    _positive("trainer.micro_batch_size", micro_batch)
    dp = world.world_size // tp
    per_step = micro_batch * dp
    if global_batch % per_step:
        lower = max(per_step, global_batch // per_step * per_step)
        # What an elastic job that lost or gained nodes needs to know: the world sizes this batch allows.
        sizes = [w for w in range(tp, 2 * max(world.world_size, 1) + 1, tp)
                 if global_batch % (micro_batch * w // tp) == 0]
        ranks = (f"world size = {micro_batch} * {world.world_size}" if tp == 1 else
                 f"data-parallel size = {micro_batch} * {dp} (world size {world.world_size} / parallel.tp={tp})")
        raise MptlikeError(
            f"trainer.global_batch_size={global_batch} is not divisible by trainer.micro_batch_size * {ranks} = "
            f"{per_step}: use a multiple of {per_step} such as {lower} or "
            f"{lower + per_step}, or change trainer.micro_batch_size (world sizes up to {2 * world.world_size} that "
            f"divide it at micro-batch {micro_batch}: {', '.join(map(str, sizes)) or 'none'})"
        )
    return global_batch // per_step


def check_data(cfg: TrainConfig, model: MPTConfig) -> DataPlan:
    from mptlike.data import Manifest, TokenDataset, check_compatible
    from mptlike.data.remote import RemoteSettings, is_remote, open_remote

    if cfg.data.sources is None:
        raise MptlikeError("data=mixture needs data.sources: give data.sources=[{path: DIR, weight: W}, ...] "
                           "(or use data=folder data.path=DIR)")
    if cfg.data.sources:
        return check_mixture(cfg, model)
    if cfg.data.path is None:
        from mptlike.data.prep import default_corpus_dir

        path = default_corpus_dir(cfg.data.vocab_size)
        if model.vocab_size < cfg.data.vocab_size:
            raise MptlikeError(
                f"model.vocab_size={model.vocab_size} is smaller than the default corpus's data.vocab_size="
                f"{cfg.data.vocab_size}: raise model.vocab_size or lower data.vocab_size"
            )
        if not (path / "manifest.json").is_file():
            return DataPlan(path, True, True, None)
        default = True
    elif is_remote(cfg.data.path):  # s3://, gs://, ...: its local view (manifest, tokenizer; shards on demand)
        path = open_remote(cfg.data.path, RemoteSettings.from_config(cfg.data))
        default = False
    else:
        path = Path(cfg.data.path)
        default = False
        if not path.is_dir():
            raise MptlikeError(
                f"data.path={cfg.data.path} does not exist: prepare it with `mptlike-prep INPUT... --out "
                f"{cfg.data.path}` or drop data.path to use the default corpus"
            )
    manifest = Manifest.load(path)
    check_compatible(manifest, model.vocab_size)
    # Opening the train split checks shard sizes and that one sample of max_seq_len + 1 tokens fits.
    TokenDataset(path, split="train", seq_len=model.max_seq_len, verify=cfg.data.verify)
    return DataPlan(path, default, False, manifest.vocab_size)


def check_mixture(cfg: TrainConfig, model: MPTConfig) -> DataPlan:
    """data.sources: every folder exists, shares are valid, one tokenizer, each train split gives a sample."""
    from mptlike.data import Manifest, TokenDataset, check_compatible
    from mptlike.data.mixture import check_same_tokenizer, resolve_sources
    from mptlike.data.remote import RemoteSettings

    if cfg.data.path is not None:
        raise MptlikeError(f"data.path={cfg.data.path} and data.sources are both set: use data=mixture with "
                           "data.sources, or data=folder with data.path")
    specs = resolve_sources(cfg.data.sources, RemoteSettings.from_config(cfg.data))
    manifests = [Manifest.load(s.path) for s in specs]
    check_same_tokenizer(manifests, [s.name for s in specs])
    check_compatible(manifests[0], model.vocab_size)
    for s in specs:
        TokenDataset(s.path, split="train", seq_len=model.max_seq_len, verify=cfg.data.verify)
    return DataPlan(specs[0].path, False, False, manifests[0].vocab_size, sources=specs)


# What must agree between init_from's config.json and the configured model for the weights to load.
_SHAPE_KEYS = ("d_model", "n_heads", "n_layers", "expansion_ratio", "vocab_size", "kv_n_heads", "no_bias",
               "tie_word_embeddings", "learned_pos_emb", "qk_ln")


def check_init_from(path_text: str, model: MPTConfig) -> Path:
    from mptlike.model.mpt import CONFIG_NAME, MODEL_TYPE, WEIGHTS_NAME

    path = Path(path_text)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise MptlikeError(
                f"init_from={path_text} has no {name}: give a folder written by save_pretrained (a run's final/) "
                f"or by `mptlike-convert from-hf`"
            )
    try:
        values = json.loads((path / CONFIG_NAME).read_text())
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise MptlikeError(
            f"init_from={path_text}: {CONFIG_NAME} is unreadable ({short_error(exc)}): re-export the folder"
        ) from None
    if values.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise MptlikeError(f"init_from={path_text} is not an mptlike folder: convert it with `mptlike-convert from-hf`")
    saved = MPTConfig.from_dict(values)
    try:
        from safetensors import safe_open

        # Reads the header only, and checks it against the file's length: catches truncation.
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            f.keys()
    except Exception as exc:  # SafetensorError, OSError: a damaged or truncated file
        raise MptlikeError(
            f"init_from={path_text}: {WEIGHTS_NAME} is damaged ({short_error(exc)}): re-export the folder"
        ) from None
    wrong = [k for k in _SHAPE_KEYS if getattr(saved, k) != getattr(model, k)]
    if wrong:
        diffs = ", ".join(f"model.{k}={getattr(model, k)} vs {getattr(saved, k)}" for k in wrong)
        raise MptlikeError(
            f"init_from={path_text} holds a different model shape ({diffs}): choose the matching model= preset "
            f"or override those keys to the saved values"
        )
    return path


def _check_misc(cfg: TrainConfig) -> None:
    """Numbers and paths the schema's types cannot bound (its choices were checked while composing)."""
    t, o, s = cfg.trainer, cfg.optim, cfg.sample
    _positive("trainer.devices", t.devices)
    _positive("trainer.num_nodes", t.num_nodes)
    _positive("trainer.max_steps", t.max_steps)
    _positive("trainer.log_every_n_steps", t.log_every_n_steps)
    _non_negative("trainer.peak_flops", t.peak_flops, "use 0 (detect) or the device's FLOP/s")
    check_optimizer_args(name=o.name, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, impl=o.impl)
    _non_negative("optim.grad_clip", o.grad_clip, "use a positive max norm, or 0 to disable")
    _positive("guard.max_skips", cfg.guard.max_skips, zero_ok=True)
    _positive("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps, zero_ok=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last, zero_ok=True)
    _positive("eval.every_n_steps", cfg.eval.every_n_steps, zero_ok=True)
    _positive("eval.max_samples", cfg.eval.max_samples)
    check_tasks_config(cfg)  # before trainer.backend=composer looks for Composer: it refuses eval.tasks
    _positive("data.num_workers", cfg.data.num_workers, zero_ok=True)
    _positive("sample.max_new_tokens", s.max_new_tokens, zero_ok=True)
    _non_negative("sample.temperature", s.temperature, "use 0 (greedy) or a positive number")
    if s.top_k is not None and s.top_k < 1:
        raise MptlikeError(f"sample.top_k={s.top_k} is invalid: use null or a positive integer")
    if not cfg.run_dir:
        raise MptlikeError("run_dir is empty: give a folder for checkpoints and logs, e.g. run_dir=runs/my-run")
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise MptlikeError(f"run_dir={cfg.run_dir} is a file: give a folder")
    if not cfg.resume:
        raise MptlikeError("resume is empty: use auto, never or a checkpoint folder")


def _check_tp_features(cfg: TrainConfig, tp: int) -> None:
    """What tensor parallelism (parallel.tp > 1) does not combine with, refused with the way around it."""
    if cfg.parallel.float8:
        raise MptlikeError(f"parallel.float8=true with parallel.tp={tp}: float8 layers split by tensor parallelism "
                           f"are not built; use parallel.tp=1 (FSDP2 or HSDP) with float8, or bf16 with parallel.tp")
    if cfg.eval.tasks:
        raise MptlikeError(f"eval.tasks with parallel.tp={tp}: the lm-eval adapter splits its requests over all ranks, "
                           f"not over tensor-parallel groups; drop eval.tasks and score run_dir/final with "
                           f"`mptlike-eval --tasks ...`, or use parallel.tp=1")


WANDB_INSTALL_HINT = "pip install 'mptlike[wandb]'"


def check_wandb_installed(cfg: TrainConfig) -> None:
    """logger=wandb needs the optional wandb package (the `wandb` extra); found here, not when the
    logger starts after the run folder is written. logger.mode=disabled logs nothing and needs none."""
    import importlib.util

    if str(cfg.logger.name) != "wandb" or str(cfg.logger.mode) == "disabled":
        return
    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # a broken or half-imported package
        found = False
    if not found:
        raise MptlikeError(f"logger=wandb needs Weights & Biases, which is not installed here: {WANDB_INSTALL_HINT} "
                           f"(or use logger=csv)")


# Keys a restart may change without it being another run: how it starts, how long, what it shows.
_RESTART_KEYS = ("resume", "dry_run", "init_from", "trainer.max_steps", "trainer.progress_bar",
                 "trainer.log_every_n_steps", "checkpoint.overwrite")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


# Model keys a resumed run may change: how attention is computed, dropout, and the initialization
# (a resumed model is not initialized). Everything else in model.* changes what the weights mean.
_RESUMABLE_MODEL_KEYS = ("attn_impl", "emb_pdrop", "resid_pdrop", "attn_pdrop")


def run_identity(cfg: TrainConfig, data_path: Path | None) -> dict[str, Any]:
    """What a checkpoint must share with the run that continues it: the model, the optimizer whose
    state it holds, and the data (tokenizer and the exact training shards). Recorded in every checkpoint."""
    from mptlike.data import Manifest

    model = {k: v for k, v in cfg.model.to_dict().items()
             if k not in _RESUMABLE_MODEL_KEYS and not k.startswith(("init_", "emb_init_"))}
    identity: dict[str, Any] = {f"model.{k}": v for k, v in model.items()}
    identity["optim.name"] = str(cfg.optim.name)
    if data_path is not None and (Path(data_path) / "manifest.json").is_file():
        m = Manifest.load(data_path)
        shards = hashlib.sha256("".join(s.sha256 for s in m.shards.get("train", [])).encode()).hexdigest()
        identity.update({"data.tokenizer": m.tokenizer, "data.vocab_size": m.vocab_size, "data.eos_id": m.eos_id})
        if not cfg.data.sources:  # a mixture may change its sources at a resume (a new phase)
            identity.update({"data.train_tokens": m.num_tokens.get("train", 0), "data.train_shards_sha256": shards})
    return identity


def check_same_run(cfg: TrainConfig, data_path: Path | None, checkpoint: Path) -> None:
    """Refuse to continue `checkpoint` with another model, optimizer or data; reads, writes nothing."""
    saved = read_train_state(checkpoint).get("identity")
    if not saved:
        return  # written before checkpoints recorded their run: nothing to compare
    current = json.loads(json.dumps(run_identity(cfg, data_path)))  # as the checkpoint's JSON holds it
    differ = [k for k in current if k in saved and saved[k] != current[k]]
    if not differ:
        return
    shown = ", ".join(f"{k}={current[k]} (checkpoint: {saved[k]})" for k in differ[:3])
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    raise MptlikeError(
        f"{checkpoint} was written by another run than this config describes ({shown}{more}): restore those "
        f"settings to continue it, or start a new run with another run_dir (init_from= can take its weights); "
        f"nothing was changed"
    )


def check_run_dir_free(cfg: TrainConfig) -> None:
    """A fresh start must not take over a run_dir whose config.yaml describes another run."""
    import yaml

    from mptlike.train.redact import redact

    saved_file = Path(cfg.run_dir) / CONFIG
    if not saved_file.is_file():
        return
    try:
        saved = _flatten(yaml.safe_load(saved_file.read_text()) or {})
    except yaml.YAMLError:
        saved = {}
    current = _flatten(redact(config_to_dict(cfg)))
    keys = sorted(set(saved) | set(current))
    differ = [k for k in keys if k not in _RESTART_KEYS and saved.get(k) != current.get(k)]
    if differ:
        shown = ", ".join(f"{k}={current.get(k)} (saved {saved.get(k)})" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise MptlikeError(
            f"run_dir={cfg.run_dir} holds another run ({shown}{more}) and no checkpoint to resume: use another "
            f"run_dir, or checkpoint.overwrite=true to start over there"
        )


def check_composer_plan(plan: RunPlan) -> None:
    """What the Composer backend cannot do, refused before anything is prepared or written."""
    world, cfg = plan.world, plan.cfg
    if cfg.data.sources:
        raise MptlikeError("data.sources (a mixture) with trainer.backend=composer: the Composer backend reads one "
                           "folder; use data=folder data.path=DIR or trainer.backend=lightning")
    if plan.mesh.tp > 1:
        raise MptlikeError(
            f"parallel.tp={plan.mesh.tp} with trainer.backend=composer: tensor parallelism is applied by mptlike's own "
            f"parallelize, which the Composer backend does not use; use parallel.tp=1 or trainer.backend=lightning")
    if plan.mesh.hsdp:
        raise MptlikeError(
            f"parallel.dp_replicate={plan.mesh.dp_replicate} (HSDP) with trainer.backend=composer: the Composer "
            f"backend shards over all ranks only; use parallel.dp_replicate=1 or trainer.backend=lightning")
    if cfg.parallel.float8:
        raise MptlikeError("parallel.float8=true with trainer.backend=composer: float8 is applied by mptlike's own "
                           "parallelize, which the Composer backend does not use; drop parallel.float8 or use "
                           "trainer.backend=lightning")
    if cfg.debug.profile_steps:
        raise MptlikeError("debug.profile_steps with trainer.backend=composer: the profiler is built into the "
                           "Lightning loop only; drop debug.profile_steps or use trainer.backend=lightning")
    if world.world_size > 1 and not world.external:
        raise MptlikeError(
            f"trainer.devices x trainer.num_nodes = {world.world_size} processes with trainer.backend=composer "
            f"need a launcher: run `torchrun --nproc_per_node={world.devices} -m mptlike.train ...` "
            f"(or `composer -n {world.devices} -m mptlike.train ...`)"
        )
    if plan.accelerator == "cpu" and plan.precision.name != "fp32":
        raise MptlikeError(
            f"trainer.precision={cfg.trainer.precision} with trainer.backend=composer on CPU: Composer trains on "
            "CPU in fp32 only; use trainer.precision=fp32 or a GPU"
        )
    if world.world_size > 1 and plan.accelerator == "cpu" and str(cfg.parallel.init) == "sharded":
        raise MptlikeError(
            "parallel.init=sharded with trainer.backend=composer needs GPUs (Composer allocates meta parameters "
            "on CUDA): use parallel.init=rank0 or auto"
        )
    if str(cfg.guard.nonfinite) == "rollback":
        raise MptlikeError(
            "guard.nonfinite=rollback with trainer.backend=composer: Composer cannot reload a checkpoint in the "
            "middle of fit(); use guard.nonfinite=skip (or stop, then resume=auto), or trainer.backend=lightning"
        )


def estimate_memory(plan: RunPlan):
    """The per-rank peak memory of one training step of `plan` (mptlike.parallel.memory): nothing allocated."""
    from mptlike.parallel.memory import estimate_training_memory

    cfg = plan.cfg
    return estimate_training_memory(
        plan.model_config, micro_batch=cfg.trainer.micro_batch_size, precision=plan.precision,
        parallel=plan.parallel, world_size=plan.mesh.dp_shard if plan.mesh.hsdp else plan.mesh.dp_size,
        tp=plan.mesh.tp, accumulation_steps=plan.accumulation_steps,
        optimizer=str(cfg.optim.name), optimizer_impl=str(cfg.optim.impl),
        device="cuda" if plan.accelerator == "gpu" else "cpu")


# The estimate is within ~6% of what was measured (tests allow 15%): only a run that needs more than
# this multiple of the device's whole memory is refused; one near the limit is left to try.
_MEMORY_MARGIN = 1.15


def _device_memory_bytes(plan: RunPlan) -> tuple[int, str]:
    """(bytes one rank may use, what they are) on this machine."""
    if plan.accelerator == "gpu":
        index = int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"the GPU ({props.name}) has"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    processes = plan.world.devices
    share = f" shared by {processes} processes ({total / 1e9:.1f} GB in all)" if processes > 1 else ""
    return total // processes, f"this machine's memory{share} is"


def check_memory_fits(plan: RunPlan) -> None:
    """Refuse, before anything is allocated, a run that cannot fit the device whatever the allocator does."""
    need = estimate_memory(plan).peak_bytes
    have, where = _device_memory_bytes(plan)
    if need > _MEMORY_MARGIN * have:
        raise MptlikeError(
            f"{plan.cfg.name} needs about {need / 1e9:.1f} GB per process (estimated for model d_model="
            f"{plan.model_config.d_model} n_layers={plan.model_config.n_layers}, micro batch "
            f"{plan.cfg.trainer.micro_batch_size}) but {where} {have / 1e9:.1f} GB per process: use a smaller model= "
            f"preset or "
            f"trainer.micro_batch_size, parallel.activation_checkpointing=full, more devices (FSDP2 shards the "
            f"state) or a GPU; `--estimate-memory` prints the breakdown"
        )


def build_plan(cfg: TrainConfig) -> RunPlan:
    """All validation; reads files (data manifest, checkpoints) but writes nothing."""
    from mptlike.ops.attention import check_attn_impl, resolve_attn_impl

    model = cfg.model  # an MPTConfig, validated when the config was built
    _check_misc(cfg)
    accelerator = _accelerator(cfg.trainer.accelerator, cfg.dry_run)
    # attn_impl=auto becomes one backend for this machine; cfg.model keeps "auto", so config.yaml and
    # final/config.json stay portable.
    model = dataclasses.replace(model, attn_impl=resolve_attn_impl(
        model.attn_impl, "cuda" if accelerator == "gpu" else "cpu", attn_pdrop=model.attn_pdrop,
        head_dim=model.head_dim))
    if model.attn_impl == "flex" and accelerator == "cpu" and not cfg.dry_run:
        # Found at the first backward otherwise, after the run has started and written its config.
        raise MptlikeError("model.attn_impl=flex cannot train on CPU (FlexAttention has no CPU backward): use "
                           "model.attn_impl=sdpa or auto, or a GPU")
    world = detect_world(cfg.trainer.devices, cfg.trainer.num_nodes)
    mesh = resolve_mesh(cfg.parallel.dp_replicate, cfg.parallel.dp_shard, world.world_size, cfg.parallel.tp)
    check_tensor_parallel(model, mesh.tp, world.world_size)
    if mesh.tp > 1:
        _check_tp_features(cfg, mesh.tp)
        if mesh.tp > world.devices:
            log.warning("parallel.tp=%d spans nodes (%d devices per node): every block all-gathers and "
                        "reduce-scatters over the slow links; keep tp within a node", mesh.tp, world.devices)
    _check_profile_steps(cfg.debug.profile_steps, cfg.trainer.max_steps)
    accum = _check_batch(cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, world, mesh.tp)
    precision = resolve_precision(
        cfg.trainer.precision,
        cuda=accelerator == "gpu",
        sharded=world.world_size > 1,
        param_dtype=cfg.parallel.param_dtype,
        reduce_dtype=cfg.parallel.reduce_dtype,
    )
    parallel = ParallelPlan(
        ac_mode=cfg.parallel.activation_checkpointing,
        ac_every=cfg.parallel.ac_every,
        compile=cfg.parallel.compile,
        reshard_after_forward=cfg.parallel.reshard_after_forward,
        accumulate_unsharded=cfg.parallel.accumulate_unsharded,
        float8=cfg.parallel.float8,
        float8_recipe=str(cfg.parallel.float8_recipe),
        float8_all_gather=cfg.parallel.float8_all_gather,
    )
    schedule = Schedule(str(cfg.optim.schedule), cfg.trainer.max_steps, cfg.optim.warmup_steps, cfg.optim.alpha_f,
                        timing=str(cfg.optim.lr_timing))
    data = None
    resume_from = None
    init_from = None
    start_step = 0
    composer = str(cfg.trainer.backend) == "composer"
    if not cfg.dry_run:
        check_attn_impl(model.attn_impl)
        if cfg.parallel.float8:
            check_float8(precision=precision.name, accelerator=accelerator)
            if not cfg.parallel.compile:
                log.warning("parallel.float8 without parallel.compile: torchao's casts to float8 then run as "
                            "separate kernels and the step is usually slower than in bf16; add parallel.compile=true")
        check_wandb_installed(cfg)
        data = check_data(cfg, model)
        if cfg.eval.tasks:
            check_tasks(cfg, None if data.needs_prepare else data.path)
        if composer:
            # Composer is optional (its own environment); its checkpoint layout is read with torch alone.
            from mptlike.integrations.composer import checkpoints as composer_checkpoints

            composer_checkpoints.require_composer()
            resume_from = composer_checkpoints.resolve_composer_resume(cfg.resume, cfg.run_dir,
                                                                       overwrite=cfg.checkpoint.overwrite)
            start_step = composer_checkpoints.checkpoint_step(resume_from) if resume_from is not None else 0
        else:
            resume_from = resolve_resume(cfg.resume, cfg.run_dir, overwrite=cfg.checkpoint.overwrite)
            start_step = checkpoint_step(resume_from) if resume_from is not None else 0
            if resume_from is not None:
                check_same_run(cfg, None if data.needs_prepare else data.path, resume_from)
        if resume_from is None and not cfg.checkpoint.overwrite:
            check_run_dir_free(cfg)
        if cfg.init_from:
            init_from = check_init_from(cfg.init_from, model)
        if data.is_default_corpus and cfg.data.path is None:
            # The plan's own copy names the folder (config.yaml records it); the caller's cfg is left as given.
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data.path)))
    plan = RunPlan(
        cfg=cfg,
        config_dict=config_to_dict(cfg),
        model_config=model,
        world=world,
        accelerator=accelerator,
        accumulation_steps=accum,
        precision=precision,
        parallel=parallel,
        schedule=schedule,
        data=data,
        resume_from=resume_from,
        start_step=start_step,
        init_from=init_from,
        mesh=mesh,
    )
    if composer and not cfg.dry_run:
        check_composer_plan(plan)
    if not cfg.dry_run:
        check_memory_fits(plan)
    return plan
