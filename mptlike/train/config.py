"""The training config: a typed schema under Hydra's config tree, composed without side effects.

`compose_config(overrides)` uses Hydra's compose API instead of `@hydra.main`: nothing is written,
no output folder or logging is set up, and every error surfaces as one exception that the command
line turns into one line. The schema below is registered as the base of `conf/config.yaml`: it holds
every key's default, and an unknown key, a value of the wrong type or a choice outside its Enum fails
during composition with the key named. The files under conf/ state only what a group option changes.
A user's own folder (--config-dir) is searched before conf/, hydra.searchpath folders after it, and
`expand_sweep` turns the sweeps of `mptlike-train -m` into one override list per job (Hydra's basic
sweeper); the jobs run in mptlike.train.multirun's layout.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from mptlike.errors import MptlikeError
from mptlike.model import MPTConfig
from mptlike.model.presets import PRESETS
from mptlike.parallel.float8 import FLOAT8_RECIPES
from mptlike.parallel.materialize import INIT_MODES
from mptlike.parallel.parallelize import AC_MODES
from mptlike.parallel.precision import DTYPES
from mptlike.train.optim import DECAY_PARAMS, IMPLS, OPTIMIZERS
from mptlike.train.schedule import LR_TIMINGS, SCHEDULES

SCHEMA_NAME = "mptlike_schema"


class Choice(str, enum.Enum):
    """A key with a fixed set of values: OmegaConf rejects any other while composing.

    Each member's name is its value, so a member equals, hashes like and prints as the string a user
    types (`cfg.trainer.backend == "composer"`, f"{cfg.optim.name}") and code downstream can treat
    it as that string.
    """

    __str__ = str.__str__
    __format__ = str.__format__


def choices(name: str, values: tuple[str, ...]) -> type[Choice]:
    # The functional form because some values are not identifiers ("for").
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


# The lists that inner code also checks against stay in that code; the schema builds on them.
Backend = choices("Backend", ("lightning", "composer"))
Accelerator = choices("Accelerator", ("auto", "cpu", "gpu"))
Precision = choices("Precision", ("auto", *DTYPES))
ParamDtype = choices("ParamDtype", ("auto", *DTYPES))
ReduceDtype = choices("ReduceDtype", tuple(DTYPES))
ActivationCheckpointing = choices("ActivationCheckpointing", AC_MODES)
InitMode = choices("InitMode", INIT_MODES)
Float8Recipe = choices("Float8Recipe", FLOAT8_RECIPES)
OptimName = choices("OptimName", OPTIMIZERS)
LrSchedule = choices("LrSchedule", SCHEDULES)
LrTiming = choices("LrTiming", LR_TIMINGS)
DecayParams = choices("DecayParams", DECAY_PARAMS)
OptimImpl = choices("OptimImpl", IMPLS)
LoggerName = choices("LoggerName", ("csv", "wandb", "none"))
WandbMode = choices("WandbMode", ("offline", "online", "disabled"))
NonfinitePolicy = choices("NonfinitePolicy", ("stop", "skip", "rollback"))


@dataclass
class DataSourceConfig:
    # One folder of a mixture (data=mixture), written by `mptlike-prep`; all sources share one tokenizer.
    path: str = MISSING
    name: Optional[str] = None  # in val/<name>/loss and samples.jsonl; default: the folder's basename
    weight: Optional[float] = None  # relative share of the training samples (normalised); default 1
    tokens: Optional[int] = None  # instead of weight: a token budget, the weights being the budgets' shares
    epochs: Optional[float] = None  # at most this many passes over the source; null: no cap


@dataclass
class DataConfig:
    # A folder written by `mptlike-prep`. null means the default corpus (Python's standard library
    # docs and sources, BPE-tokenized) under $MPTLIKE_DATA (default ./data), prepared when missing.
    # The schema leaves it unset (data=stdlib sets null) so that `data=folder` without
    # `data.path=DIR` is an error: OmegaConf only refuses a missing value that the schema declares.
    path: Optional[str] = MISSING
    vocab_size: int = 8192  # BPE size of the default corpus; ignored for a user folder
    num_workers: int = 0
    verify: bool = False  # check every shard's sha256 before training
    # A weighted mixture of folders instead of data.path (mptlike.data.mixture): sampled in proportion
    # to the weights in every global batch. Resuming with other sources or weights starts a new phase.
    # data=mixture sets null, which must then be given: [] (the schema's) means no mixture.
    sources: Optional[List[DataSourceConfig]] = field(default_factory=list)
    # A path (or a source's path) may be a URL: s3://bucket/prefix, gs://..., any fsspec URL
    # (mptlike.data.remote). Its shards are fetched on demand into this cache, shared by the ranks of a
    # node; null: $MPTLIKE_CACHE, else ~/.cache/mptlike. Put it on a local disk (it is locked with flock).
    cache_dir: Optional[str] = None
    cache_max_gb: float = 50.0  # least recently used shards are evicted beyond this; 0: no bound
    prefetch_shards: int = 4  # shards a background thread fetches ahead of the loader, per rank
    remote_retries: int = 5  # attempts per request on a transient error (reset, timeout, HTTP 5xx)
    remote_backoff_s: float = 1.0  # first wait between attempts; doubles each time, at most 30 s
    # Passed to the fsspec file system, e.g. {endpoint_url: "http://minio:9000"} for s3 (credentials
    # are better left to the environment: AWS_ACCESS_KEY_ID, AWS_PROFILE, ...).
    storage_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    backend: Backend = Backend("lightning")  # composer: mptlike.integrations.composer, needs MosaicML Composer
    accelerator: Accelerator = Accelerator("auto")
    devices: int = 1  # processes per node; torchrun's LOCAL_WORLD_SIZE wins when launched by it
    num_nodes: int = 1
    precision: Precision = Precision("auto")  # auto: bf16 on a bf16 GPU, else fp32
    max_steps: int = 1000
    global_batch_size: int = 256  # sequences per optimizer step, summed over all ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    log_every_n_steps: int = 10
    # Per-device peak FLOP/s for MFU; 0 = detect from the GPU name (H100 SXM/H200 989e12, H100 PCIe
    # 756e12, H100/H200 NVL 835e12, A100 312e12).
    peak_flops: float = 0.0
    progress_bar: bool = True


@dataclass
class ParallelConfig:
    # Recompute activations in backward: full = every block, every_k = every ac_every-th block.
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing("none")
    ac_every: int = 2  # with every_k: checkpoint blocks 0, k, 2k, ...
    compile: bool = False  # torch.compile each block
    reshard_after_forward: bool = True  # full sharding (ZeRO-3); false keeps params gathered until backward
    param_dtype: ParamDtype = ParamDtype("auto")  # FSDP2 compute dtype; auto follows trainer.precision
    reduce_dtype: ReduceDtype = ReduceDtype("fp32")  # gradient reduce-scatter dtype
    init: InitMode = InitMode("auto")  # how weights leave the meta device: see mptlike.parallel.materialize
    # With gradient accumulation under FSDP2: false (default) reduce-scatters after every micro-batch,
    # so a rank holds only its gradient shard; true reduce-scatters once, after the last micro-batch
    # (less communication, but a full fp32 gradient of the whole model on every rank: small models only).
    accumulate_unsharded: bool = False
    # The data-parallel mesh (mptlike.parallel.mesh); dp_replicate x dp_shard must equal the world size.
    # dp_replicate > 1 is HSDP: shard within groups of dp_shard ranks (e.g. one node), replicate across
    # the groups. dp_shard=-1: the world size divided by dp_replicate.
    dp_replicate: int = 1
    dp_shard: int = -1
    # Tensor parallelism with sequence parallelism (mptlike.parallel.tensor_parallel): groups of tp consecutive
    # ranks (within a node) split every block, each owning whole heads; they read the same data, so
    # dp_replicate x dp_shard x tp = the world size. It must divide model.n_heads, kv_n_heads and the MLP width.
    tp: int = 1
    # float8 matmuls in the blocks' linear layers (torchao, the `float8` extra; GPUs of compute capability 8.9+
    # such as H100, H200, L40S): the embedding and head stay bf16, checkpoints are the same as without float8.
    float8: bool = False
    # tensorwise: one scale per tensor, the fastest; rowwise: one scale per row, closer to bf16 and slower
    float8_recipe: Float8Recipe = Float8Recipe("tensorwise")
    # null: FSDP2 all-gathers tensorwise weights in float8 (half of bf16's bytes); rowwise always gathers bf16
    float8_all_gather: Optional[bool] = None


@dataclass
class OptimConfig:
    # Adam with weight decay decoupled from the learning rate (llm-foundry's decoupled_adamw).
    name: OptimName = OptimName("decoupled_adamw")
    lr: float = 6.0e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled: weights shrink by weight_decay * lr / optim.lr per step
    # all: every parameter decays, norms and biases too (llm-foundry, torchtitan, litgpt);
    # matrices: linear weights and embeddings only (nanoGPT's split)
    decay_params: DecayParams = DecayParams("all")
    schedule: LrSchedule = LrSchedule("cosine")  # after warmup
    warmup_steps: int = 100
    alpha_f: float = 0.1  # final lr as a fraction of optim.lr
    # composer: step t trains with the schedule's value at t - 1 (steps 0 and 1 at that of 0), as every
    # Composer / llm-foundry run does; exact: at t (mptlike.train.schedule)
    lr_timing: LrTiming = LrTiming("composer")
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    impl: OptimImpl = OptimImpl("auto")  # auto: fused on GPU, foreach elsewhere


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName("csv")
    mode: WandbMode = WandbMode("offline")  # for wandb
    project: str = "mptlike"
    entity: Optional[str] = None
    group: Optional[str] = None
    run_name: Optional[str] = None  # null: the experiment name
    tags: List[str] = field(default_factory=list)
    log_model: bool = False  # for wandb: the exported final/ folder as a W&B model artifact


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100  # 0: only at the end
    keep_last: int = 2  # newest complete checkpoints kept; 0 keeps all
    save_final: bool = True
    export_final: bool = True  # run_dir/final: config.json + model.safetensors (save_pretrained)
    # Start a fresh run in a run_dir that holds another run: with resume=never, delete its
    # checkpoints; with any resume, accept a run_dir whose config.yaml describes a different run.
    overwrite: bool = False
    # Write the tensors from a background thread (torch.distributed.checkpoint.async_save) while
    # training continues; costs one extra CPU copy of the model and optimizer state per rank.
    async_save: bool = False


@dataclass
class GuardConfig:
    # What a step with a NaN/inf loss or gradient norm does (detected before the optimizer step,
    # so the weights stay finite): stop (exit 2 naming the step and its samples) | skip (drop the
    # update, the data moves on) | rollback (reload the newest complete checkpoint and pass over
    # the offending global batch).
    nonfinite: NonfinitePolicy = NonfinitePolicy("skip")
    max_skips: int = 10  # skip/rollback events allowed in a run; one more stops it


@dataclass
class DebugConfig:
    # Rank 0 appends {"step": N, "samples": [global sample indices]} per step to run_dir/samples.jsonl
    # (rows past a resumed step are dropped on resume), to audit the data order across restarts.
    log_sample_ids: bool = False
    # [a, b]: a torch.profiler trace of steps a..b (1-based, inclusive) per rank under
    # run_dir/profile/rank{R}/ (Chrome/Perfetto JSON), and on CUDA a memory snapshot per rank there.
    profile_steps: Optional[List[int]] = None


@dataclass
class EvalConfig:
    every_n_steps: int = 100  # 0 disables periodic validation
    max_samples: int = 64  # validation sequences per evaluation (from the start of the val split)
    at_end: bool = True  # validation loss, and eval.tasks, once more after the last step
    # lm-eval tasks during training (needs the `eval` extra): task or group names and/or task YAML
    # files, scored on the model being trained and logged as eval/<task>/<metric> (mptlike.train.tasks).
    tasks: List[str] = field(default_factory=list)
    # 0: only at the end of training (with eval.at_end). Not eval.every_n_steps by default: a task
    # such as hellaswag costs far more than the validation loss; ${eval.every_n_steps} follows it.
    tasks_every_n_steps: int = 0
    tasks_limit: Optional[int] = None  # examples per task (the first N); null: all. For a quick signal
    tasks_num_fewshot: Optional[int] = 0  # examples in each prompt; null: each task's own default
    tasks_include_path: Optional[str] = None  # a folder of task YAMLs whose tasks eval.tasks names


@dataclass
class SampleConfig:
    prompt: str = "def "
    max_new_tokens: int = 64  # 0: no sample at the end
    temperature: float = 0.8
    top_k: Optional[int] = 40


# The model keys that a model file leaves out (a user's model/NAME.yaml may state only d_model and n_layers).
SCHEMA_MODEL = "mpt-tiny"


def _schema_model() -> MPTConfig:
    """mpt-tiny's values, the default model's, with kv_n_heads left null (as mptlike's model files have it):
    null is multi-head attention with as many kv heads as n_heads, so a file or an override that changes
    only n_heads stays valid. MPTConfig resolves it when the composed config is validated."""
    model = MPTConfig.from_preset(SCHEMA_MODEL)
    model.kv_n_heads = PRESETS[SCHEMA_MODEL].get("kv_n_heads")
    return model


@dataclass
class TrainConfig:
    name: str = "quickstart"  # the experiment's name: the W&B run name and the default run_dir
    run_dir: str = "runs/${name}"
    seed: int = 17
    resume: str = "auto"  # auto: the newest complete checkpoint in run_dir | never | a checkpoint folder
    # Start a fresh run from these weights: a save_pretrained folder (run_dir/final, or the output of
    # `mptlike-convert from-hf`). Ignored when resuming from a checkpoint, which has its own weights.
    init_from: Optional[str] = None
    dry_run: bool = False  # validate, build on meta, print sizes and batch arithmetic, write nothing
    model: MPTConfig = field(default_factory=_schema_model)  # a model file's base: see SCHEMA_MODEL
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def conf_dir() -> Path:
    """The config tree: mptlike/conf/ in an installed wheel (pyproject.toml ships the repository's
    conf/ there), else conf/ at the root of the checkout (an editable install, or the source tree)."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "conf", package.parent / "conf"):
        if (folder / "config.yaml").is_file():
            return folder
    return package / "conf"  # neither: the error names where an installed package keeps it


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def compose_config(overrides: Sequence[str], folder: Path | None = None, *, config_dir: Path | None = None,
                   config_name: str = "config") -> Any:
    """The composed (not yet validated) DictConfig of conf/ (or another folder of the same layout);
    raises MptlikeError for any composition error.

    The config search path, first match wins: `config_dir` (the command line's --config-dir), then
    `folder`, then the entries of a `hydra.searchpath=[...]` override (after ours, where Hydra appends
    them). `config_name` is the primary config (--config-name), looked up along that path.
    `~KEY` resets a key to the schema's default (a structured config cannot lose a key) and `~GROUP`
    drops a group's option as Hydra does; a sweep and any other `hydra.*` override are refused.
    """
    from hydra import compose
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    folder = folder or conf_dir()
    if not (folder / "config.yaml").is_file():
        raise MptlikeError(f"{folder / 'config.yaml'} is missing: run from a full checkout of mptlike")
    _register_schema()
    kept, searchpath = _split_overrides(parse_overrides(overrides))
    for override in kept:
        if override.is_sweep_override():
            raise MptlikeError(_sweep_without_multirun(override))
    with _hydra_search_path(folder, config_dir, searchpath) as loader:
        groups = set(loader.list_groups(""))
        resets = [i for i, o in enumerate(kept) if _is_key_delete(o, groups)]
        given = [_into_open_dict(o) for i, o in enumerate(kept) if i not in resets]
        try:
            cfg = compose(config_name=config_name, overrides=given)
        except MissingConfigException as exc:
            if str(exc).startswith("Cannot find primary config"):
                raise MptlikeError(_missing_primary(config_name, folder, config_dir, searchpath)) from None
            raise MptlikeError(describe_config_error(exc)) from None
        except (HydraException, OmegaConfBaseException) as exc:
            raise MptlikeError(describe_config_error(exc)) from None
    if OmegaConf.get_type(cfg) is not TrainConfig:
        raise MptlikeError(
            f"the primary config '{config_name}' does not build on mptlike's schema: start its defaults list with "
            f"`- config` (mptlike's conf/config.yaml; then `- _self_`, and name your file other than config.yaml) "
            f"or with `- {SCHEMA_NAME}` followed by the groups it needs"
        )
    for index in resets:
        _reset_to_schema_default(cfg, kept, index, groups)
    _apply_wandb_environment(cfg, list(overrides))
    # Hydra opens the config for `+key=value`, so a key the schema lacks lands in it and would be
    # dropped without a word when the dataclasses are built: refuse it here, like any unknown key.
    unknown = _keys_outside_schema(cfg, TrainConfig)
    if unknown:
        given_as = next((o for o in overrides if o.lstrip("+~").split("=")[0] == unknown[0]), unknown[0])
        raise MptlikeError(f"unknown config key '{unknown[0]}' (from {given_as}): check its spelling "
                           f"(`mptlike-train --cfg` shows every key)")
    return cfg


def parse_overrides(overrides: Sequence[str], loader: Any = None) -> list[Any]:
    """Hydra's parsed overrides (hydra.core.override_parser.types.Override), one line naming a bad one.
    A config loader lets glob(...) sweeps list a group's options."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create(config_loader=loader)
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except HydraException as exc:
            raise MptlikeError(f"bad override {text}: {_first_lines(str(exc))}") from None
    return parsed


# What the command line does with Hydra's own keys: mptlike-train composes with the compose API, so it has
# no job runtime (output folder, chdir, logging, launcher or sweeper) for the rest of `hydra.*` to configure.
HYDRA_RUNTIME_REFUSED = (
    "mptlike-train composes its config with Hydra's compose API and has no Hydra job runtime (output folder, "
    "chdir, logging, sweeper); it honours only hydra.searchpath=[...], hydra.run.dir= (the same as "
    "run_dir=) and, with -m, hydra.sweep.dir= (the sweep root, the same as run_dir=), hydra/launcher=submitit_slurm "
    "or submitit_local and their hydra.launcher.* settings"
)


def translate_hydra_overrides(overrides: Sequence[str], *, multirun: bool) -> list[str]:
    """The command line's overrides with Hydra's run folder keys turned into run_dir: hydra.run.dir=DIR for
    one run, hydra.sweep.dir=DIR (the sweep root) with -m. hydra.searchpath is kept for compose_config;
    every other `hydra.*` override or `hydra/GROUP=` choice is refused with one line."""
    out = []
    for text, override in zip(overrides, parse_overrides(overrides)):
        key = override.key_or_group
        if not override.is_hydra_override() or key == "hydra.searchpath":
            out.append(text)
            continue
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or override.package is not None:
            raise MptlikeError(f"{text}: {HYDRA_RUNTIME_REFUSED}")
        if key == "hydra.sweep.dir" and not multirun:
            raise MptlikeError(f"{text}: hydra.sweep.dir is the root folder of a sweep (-m/--multirun); one run's "
                               f"folder is run_dir= (or hydra.run.dir=)")
        if key == "hydra.run.dir" and multirun:
            raise MptlikeError(f"{text}: with -m/--multirun each job runs in a numbered folder under the sweep "
                               f"root; give the root as run_dir= (or hydra.sweep.dir=)")
        out.append("~run_dir" if override.is_delete() else "run_dir=" + text.split("=", 1)[1])
    return out


@dataclass(frozen=True)
class SweepJob:
    overrides: list[str]  # the whole command line's overrides, with one value of each sweep
    swept: list[str]  # the overrides that differ between the jobs (this job's value of each sweep)

    def label(self) -> str:
        return " ".join(self.swept)


def expand_sweep(overrides: Sequence[str], folder: Path | None = None, *,
                 config_dir: Path | None = None) -> list[SweepJob]:
    """Hydra's basic sweeper: one job per combination of the swept values (a comma list, choice(),
    range() or glob()), the cartesian product in the order the keys are given, the last changing
    fastest. A key given again replaces its earlier value in the earlier place, as in Hydra. Without a
    sweep: one job."""
    folder = folder or conf_dir()
    _register_schema()
    _, searchpath = _split_overrides(parse_overrides(overrides))
    with _hydra_search_path(folder, config_dir, searchpath) as loader:
        parsed = parse_overrides(overrides, loader)
        values: dict[str, list[str]] = {}
        for override in parsed:
            key = override.get_key_element()
            if not override.is_sweep_override():
                values[key] = [override.input_line]
                continue
            if not override.is_discrete_sweep():
                raise MptlikeError(f"{override.input_line}: -m sweeps comma lists, choice(), range() and glob(); "
                                   f"an interval() needs a sweeper plugin such as Optuna's, which mptlike-train "
                                   f"does not run")
            if override.is_hydra_override():
                raise MptlikeError(f"{override.input_line}: Hydra's own keys cannot be swept")
            try:
                values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            except Exception as exc:  # a glob over a key that is not a group, a range of the wrong type
                raise MptlikeError(f"bad sweep {override.input_line}: {_first_lines(str(exc))}") from None
            if not values[key]:
                raise MptlikeError(f"{override.input_line} sweeps no value: check it (glob() matched nothing?)")
    swept = {key for key, options in values.items() if len(options) > 1}
    jobs = []
    for combination in itertools.product(*values.values()):
        chosen = dict(zip(values, combination))
        jobs.append(SweepJob(list(combination), [chosen[key] for key in values if key in swept]))
    return jobs


def config_groups(folder: Path | None = None, *, config_dir: Path | None = None) -> dict[str, list[str]]:
    """Each config group along the search path (--config-dir's, then conf/) and its options."""
    from hydra.core.object_type import ObjectType

    folder = folder or conf_dir()
    _register_schema()
    with _hydra_search_path(folder, config_dir, []) as loader:
        return {group: loader.get_group_options(group, results_filter=ObjectType.CONFIG)
                for group in sorted(loader.list_groups("")) if group != "hydra"}


@contextlib.contextmanager
def _hydra_search_path(folder: Path, config_dir: Path | None, searchpath: Sequence[str]) -> Iterator[Any]:
    """Hydra initialized for the compose API on `folder`, as `initialize_config_dir` does, with
    `config_dir` searched before it and `searchpath` entries after it; yields the config loader.

    Built here rather than with `initialize_config_dir` plus a `hydra.searchpath` override because
    Hydra 1.3 appends that override's folders only after it has looked up the primary config, so a
    primary config outside the main folder is never found (CachingConfigRepository keeps the miss).
    """
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    version.setbase(None)
    search = create_config_search_path(str(folder))  # Hydra's own configs, `folder` (main), plugins, schema
    if config_dir is not None:
        search.prepend("command-line", f"file://{config_dir}", anchor="main")
    for entry in searchpath:
        search.prepend("hydra.searchpath in command-line", entry, anchor="schema")
    try:
        Hydra.create_main_hydra2(task_name="mptlike-train", config_search_path=search)
        loader = GlobalHydra.instance().config_loader()
        for source in loader.get_sources():
            if source.provider != "schema" and not source.available():
                where = "--config-dir" if source.provider == "command-line" else "hydra.searchpath entry"
                raise MptlikeError(f"{where} {source.scheme()}://{source.path} cannot be read: give an existing "
                                   f"folder (file:///abs/dir) or an importable package (pkg://package.module)")
        yield loader
    finally:
        restore_gh_from_backup(backup)


def _split_overrides(parsed: list[Any]) -> tuple[list[Any], list[str]]:
    """The overrides without hydra.searchpath, and the search path entries it gives (the last one wins).
    Any other hydra.* override is refused: translate_hydra_overrides handles the run folders first."""
    kept, searchpath = [], []
    for override in parsed:
        if not override.is_hydra_override():
            kept.append(override)
        elif override.key_or_group != "hydra.searchpath" or override.package is not None:
            raise MptlikeError(f"{override.input_line}: {HYDRA_RUNTIME_REFUSED}")
        elif override.is_delete():
            searchpath = []
        else:
            searchpath = _search_path_entries(override)
    return kept, searchpath


def _search_path_entries(override: Any) -> list[str]:
    value = override.value()
    example = "hydra.searchpath=[file:///abs/dir,pkg://package.module]"
    if override.is_sweep_override() or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MptlikeError(f"{override.input_line}: hydra.searchpath is a list of folders, e.g. {example}")
    entries = []
    for entry in value:
        scheme, sep, rest = entry.partition("://")
        if not sep:
            scheme, rest = "file", entry
        if scheme == "pkg":
            entries.append(entry)
        elif scheme == "file":
            path = Path(rest).expanduser().absolute()
            if not path.is_dir():
                raise MptlikeError(f"{override.input_line}: the folder {path} does not exist ({example})")
            entries.append(f"file://{path}")
        else:
            raise MptlikeError(f"{override.input_line}: {entry} is neither file:// nor pkg:// ({example})")
    return entries


def _sweep_without_multirun(override: Any) -> str:
    key = override.get_key_element()
    return (f"{override.input_line} sweeps {key.lstrip('+')} over several values: add -m (--multirun) to run one job "
            f"per value; a list value is written {key}=[a,b], a string with commas is quoted: {key}='a,b'")


def _missing_primary(name: str, folder: Path, config_dir: Path | None, searchpath: Sequence[str]) -> str:
    places = ([f"--config-dir {config_dir}"] if config_dir else []) + [str(folder)] + list(searchpath)
    return f"--config-name {name}: there is no {name}.yaml in {', '.join(places)}"


# Dicts whose keys are the user's own (fsspec's storage options): Hydra's struct mode refuses a key that
# is not there yet unless the override says `++`, which a user of these keys should not need to know.
OPEN_DICTS = ("data.storage_options",)


def _into_open_dict(override: Any) -> str:
    """The override as Hydra should read it: `++KEY...` for a plain `KEY...=VALUE` into an OPEN_DICTS entry."""
    line, key = override.input_line, override.key_or_group
    plain = override.package is None and not line.startswith(("+", "~"))
    if plain and any(key == k or key.startswith(k + ".") for k in OPEN_DICTS):
        return "++" + line
    return line


def _is_key_delete(override: Any, groups: set[str]) -> bool:
    """`~KEY` of a config key (not `~GROUP`, which Hydra handles by dropping the group's option)."""
    key = override.key_or_group
    return override.is_delete() and override.package is None and "/" not in key and key not in groups


_ABSENT = object()


def _reset_to_schema_default(cfg: Any, overrides: list[Any], index: int, groups: set[str]) -> None:
    """`~KEY` (overrides[index]): KEY takes the schema's default again, whatever the config files set.

    Hydra deletes the key, which a structured config does not allow. `~KEY=VALUE` resets only when KEY
    has VALUE (Hydra's conditional delete). Key overrides given after it on the command line still apply
    (Hydra applies the command line in order); group choices apply first wherever they are given.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    override = overrides[index]
    key = override.key_or_group
    schema = OmegaConf.structured(TrainConfig)
    default: Any = OmegaConf.to_container(schema, resolve=False)  # interpolations as written: runs/${name}
    for part in key.split("."):
        if not isinstance(default, dict) or part not in default:
            raise MptlikeError(f"unknown config key '{key}' (from {override.input_line}): check its spelling "
                               f"(`mptlike-train --cfg` shows every key)")
        default = default[part]
    if isinstance(default, dict):
        default = OmegaConf.select(schema, key)  # a whole section (~parallel): the typed node
    try:
        wanted = override.value()
        if wanted is not None:
            current = OmegaConf.select(cfg, key, throw_on_missing=False)
            if current != wanted:
                raise MptlikeError(f"{override.input_line}: {key} is {current}, not {wanted}, so it is kept "
                                   f"(~{key} resets it to the schema default whatever its value)")
        OmegaConf.update(cfg, key, default, merge=False)
        for later in overrides[index + 1:]:
            other = later.key_or_group
            group_choice = other in groups and not isinstance(later.value(), dict)
            if later.is_delete() or later.package is not None or group_choice:
                continue
            if other == key or other.startswith(key + ".") or key.startswith(other + "."):
                OmegaConf.update(cfg, other, later.value(), merge=True)
    except OmegaConfBaseException as exc:
        raise MptlikeError(f"bad override {override.input_line}: {describe_config_error(exc)}") from None


# W&B's own environment variables, as its users set them on clusters. One precedence: a key given on the
# command line wins over the environment, which wins over the config files and the schema.
_WANDB_ENV = {"WANDB_MODE": "logger.mode", "WANDB_PROJECT": "logger.project", "WANDB_ENTITY": "logger.entity",
              "WANDB_RUN_GROUP": "logger.group", "WANDB_TAGS": "logger.tags"}
_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # older spellings W&B still accepts


def _apply_wandb_environment(cfg: Any, overrides: list[str]) -> None:
    import os

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    given = {o.lstrip("+~").split("=")[0] for o in overrides}
    for var, key in _WANDB_ENV.items():
        value: Any = os.environ.get(var, "").strip()
        if not value or key in given:
            continue
        if var == "WANDB_MODE":
            value = _WANDB_MODE_ALIASES.get(value, value)
        if var == "WANDB_TAGS":
            value = [tag.strip() for tag in value.split(",") if tag.strip()]
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException:
            hint = "use online, offline or disabled" if key == "logger.mode" else "check its value"
            raise MptlikeError(f"{var}={os.environ[var]!r} is not a valid {key}: {hint} (or unset {var})") from None


def _keys_outside_schema(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of `node` that the dataclass `schema` (recursively) does not declare."""
    import dataclasses
    import typing

    types = typing.get_type_hints(schema)  # resolves the string annotations of `from __future__`
    out = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in types:
            out.append(path)
        elif dataclasses.is_dataclass(types[key]) and hasattr(node[key], "keys"):
            out += _keys_outside_schema(node[key], types[key], f"{path}.")
    return out


def to_train_config(cfg: Any) -> TrainConfig:
    """Resolve interpolations and build the dataclasses; MPTConfig validates the model here."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise MptlikeError(describe_config_error(exc)) from None
    assert isinstance(obj, TrainConfig)
    return obj


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data (choices as their strings) for run_dir/config.yaml, W&B and `--cfg`."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def describe_config_error(exc: BaseException) -> str:
    """One line from Hydra's and OmegaConf's multi-line messages, naming the key and the fix."""
    from omegaconf.errors import MissingMandatoryValue

    text = str(exc)
    if isinstance(exc, MissingMandatoryValue) and exc.full_key:
        return f"{exc.full_key} has no default: give it on the command line as {exc.full_key}=VALUE"
    # A Choice key given another value, on the command line or in a conf/ file ("In 'optim/sgd': ...").
    both = f"{text}\n{exc.__cause__ or ''}"
    key = re.search(r"full_key: (\S+)", both)
    choice = re.search(r"Invalid value '(.*)', expected one of \[(.*)\]", both)
    typed = re.search(r"Value (.*) \(\w+\) is not a valid input for <enum '(\w+)'>", both)  # 1.5, true
    if key and (choice or (typed and isinstance(globals().get(typed.group(2)), enum.EnumMeta))):
        value, names = choice.groups() if choice else (typed.group(1), ", ".join(globals()[typed.group(2)]))
        in_file = re.match(r"In '([^']+)'", text)
        where = f" (set in conf/{in_file.group(1)}.yaml)" if in_file else ""
        return f"{key.group(1)}={value} is unknown{where}: choose one of {names}"
    no_match = re.match(r"Could not delete '(([^'=]+)=[^']+)'\. No match in the defaults list", text)
    if no_match:
        return (f"~{no_match.group(1)} removes nothing: {no_match.group(2)} is not that option here "
                f"(~{no_match.group(2)} drops whichever option it has)")
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown:
        return f"unknown config key '{unknown.group(1)}': check its spelling (`mptlike-train --help` lists the keys)"
    missing_group = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing_group:
        group, option = missing_group.groups()
        options = re.search(r"Available options in '[^']+':\s*((?:\s*\S+)+?)\s*Config search path", text, re.S)
        choices = ", ".join(options.group(1).split()) if options else f"see conf/{group}/"
        return f"{group}={option} is not a known option: choose one of {choices}"
    cause = exc.__cause__
    if cause is not None and str(cause):
        detail = _first_lines(str(cause))
        head = _first_lines(text)
        merging = re.match(r"Error merging override (\S+)", head)
        if merging:
            return f"bad override {merging.group(1)}: {detail}"
        return f"{head}: {detail}"
    key = getattr(exc, "full_key", None)
    detail = _first_lines(text)
    return f"config key '{key}': {detail}" if key and key not in detail else detail


def _first_lines(text: str) -> str:
    # OmegaConf appends "full_key: ...\nobject_type=..." lines: keep the sentence, drop the dump.
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    return " ".join(kept or lines).rstrip(".")
