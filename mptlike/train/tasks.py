"""lm-eval tasks during training (`eval.tasks`), logged as eval/<task>/<metric>.

    mptlike-train ... eval.tasks=[hellaswag,my_tasks/qa.yaml] eval.tasks_every_n_steps=500 eval.tasks_limit=200

When: every eval.tasks_every_n_steps steps (0: never in between) and after the last step when
eval.at_end is true, on the weights of that step, which are also what a checkpoint of that step
holds: the numbers equal `mptlike-eval CHECKPOINT --tasks ... --num-fewshot K --limit N` on it.

How: every rank runs lm-eval's own `evaluate` over the whole task set with the same
`ShardedMptlikeLM` (mptlike.integrations.lm_eval): lm-eval builds the same requests on every rank,
each request type's batches are split over the ranks (batch b on rank b mod world size), the
answers are all-gathered by request index, and lm-eval then computes its metrics from the complete
list of answers, exactly as for one process. Under FSDP2 the model stays sharded; every rank runs
the same number of forward passes (see ShardedMptlikeLM). Rank 0 logs.

The random state of training (Python, NumPy, torch, CUDA) is the same after an evaluation as before
it: lm-eval runs under the seeds its simple_evaluate sets, in a forked state. Costs nothing when
eval.tasks is empty: importing this module does not import lm-eval, and the loop builds no
TaskEvaluator (the only thing here that does).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mptlike.errors import MptlikeError, short_error

log = logging.getLogger(__name__)

OPTION = "eval.tasks"
INCLUDE_OPTION = "eval.tasks_include_path"


def check_tasks_config(cfg: Any) -> None:
    """The eval.tasks* values on their own (also for a dry run): numbers, and what cannot run them."""
    e = cfg.eval
    if e.tasks_every_n_steps < 0:
        raise MptlikeError(f"eval.tasks_every_n_steps={e.tasks_every_n_steps} is invalid: use a positive number of "
                           f"steps, or 0 for the end of training only")
    if e.tasks_limit is not None and e.tasks_limit < 1:
        raise MptlikeError(f"eval.tasks_limit={e.tasks_limit} is invalid: use a number of examples per task, or "
                           f"null for all of them")
    if e.tasks_num_fewshot is not None and e.tasks_num_fewshot < 0:
        raise MptlikeError(f"eval.tasks_num_fewshot={e.tasks_num_fewshot} is invalid: use 0 or more examples, or "
                           f"null for each task's own number")
    if not e.tasks:
        return
    if str(cfg.trainer.backend) == "composer":
        raise MptlikeError("eval.tasks with trainer.backend=composer: lm-eval tasks run in the Lightning loop only; "
                           "use trainer.backend=lightning, or score the Composer run's checkpoints with "
                           "`mptlike-eval CHECKPOINT --tasks ...`")
    if not e.tasks_every_n_steps and not e.at_end:
        names = ",".join(map(str, e.tasks))
        raise MptlikeError(f"eval.tasks=[{names}] would never run: eval.tasks_every_n_steps=0 runs them at the end "
                           f"of training only, and eval.at_end=false; set eval.tasks_every_n_steps=N or "
                           f"eval.at_end=true")


def check_tasks(cfg: Any, data_path: Path | None) -> None:
    """lm-eval is installed, every task is known and every task file readable, and the data's tokenizer
    loads (`data_path`: None while the default corpus is still to be prepared). Writes nothing."""
    from mptlike.integrations.lm_eval_tasks import require_lm_eval

    require_lm_eval(OPTION)
    resolve(cfg.eval)
    if data_path is not None:
        data_tokenizer(data_path)


def resolve(eval_cfg: Any) -> tuple[list, Any]:
    from mptlike.integrations.lm_eval_tasks import resolve_tasks

    include = [eval_cfg.tasks_include_path] if eval_cfg.tasks_include_path else []
    return resolve_tasks(list(eval_cfg.tasks), include, option=OPTION, include_option=INCLUDE_OPTION)


def data_tokenizer(data_path: Path):
    """The tokenizer the training data was prepared with: what turns the tasks' text into ids."""
    from mptlike.data import Manifest
    from mptlike.data.tokenizer import load_tokenizer

    spec = Manifest.load(data_path).tokenizer
    try:
        return load_tokenizer(spec, data_path)
    except Exception as exc:  # MptlikeError for a missing file; the hub's own errors for a name
        raise MptlikeError(
            f"eval.tasks turns the tasks' text into ids with the tokenizer {data_path} was prepared with ({spec!r}), "
            f"which does not load here ({short_error(exc)}): prepare the data again with mptlike-prep (it keeps the "
            f"tokenizer next to the shards), or drop eval.tasks and score checkpoints with `mptlike-eval CHECKPOINT "
            f"--tasks ... --tokenizer SPEC`"
        ) from None


def task_metrics(results: dict) -> dict[str, float]:
    """lm-eval's results as eval/<task>/<metric>: `acc,none` is logged as acc, `exact_match,flexible-extract`
    keeps its filter. Standard errors are not computed (bootstrap_iters=0); mptlike-eval gives them."""
    metrics: dict[str, float] = {}
    for task, values in (results or {}).get("results", {}).items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                metrics[f"eval/{task}/{metric if filter_name == 'none' else key}"] = float(value)
    return metrics


@contextlib.contextmanager
def _lm_eval_seeds(device: torch.device) -> Iterator[None]:
    """The seeds lm-eval's simple_evaluate sets (Python 0, NumPy and torch 1234), in a forked random state:
    training's own state is back afterwards, so a run with tasks trains exactly as one without."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(DEFAULT_RANDOM_SEED)
            np.random.seed(DEFAULT_OTHER_SEED)
            torch.random.default_generator.manual_seed(DEFAULT_OTHER_SEED)
            if devices:
                torch.cuda.manual_seed(DEFAULT_OTHER_SEED)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """lm-eval draws a progress bar per task while it builds requests: on every rank, at every evaluation."""
    from functools import partial

    import lm_eval.api.task as task_module

    bar = getattr(task_module, "tqdm", None)
    if bar is None:
        yield
        return
    task_module.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = bar


class TaskEvaluator:
    """The tasks of eval.tasks, built once (datasets loaded before step one), scored on the live model."""

    def __init__(self, eval_cfg: Any, *, model: torch.nn.Module, data_path: Path, device: torch.device,
                 autocast: Callable[[], Any], rank: int, world_size: int, batch_size: int) -> None:
        from mptlike.integrations.lm_eval import ShardedMptlikeLM
        from mptlike.integrations.lm_eval_tasks import load_tasks

        # lm-eval logs every stage at INFO, on every rank: rank 0 keeps its warnings, the others its errors.
        logging.getLogger("lm_eval").setLevel(logging.WARNING if rank == 0 else logging.ERROR)
        tasks, manager = resolve(eval_cfg)
        self.loaded = load_tasks(tasks, manager, option=OPTION)
        for name, task in self.loaded["tasks"].items():
            _set_fewshot(name, task, eval_cfg.tasks_num_fewshot)
        self.limit = eval_cfg.tasks_limit
        self.model = model
        # A forward pass without gradients needs less memory than the training step's micro-batch.
        self.lm = ShardedMptlikeLM(model, data_tokenizer(data_path), rank=rank, world_size=world_size, device=device,
                                   batch_size=batch_size, autocast=autocast)

    @property
    def task_names(self) -> list[str]:
        return list(self.loaded["tasks"])

    def evaluate(self) -> dict[str, float]:
        """eval/<task>/<metric> of the model as it is now; the same dict on every rank."""
        from lm_eval.defaults import DEFAULT_OTHER_SEED
        from lm_eval.evaluator import evaluate

        was_training = self.model.training
        self.model.eval()
        try:
            with _lm_eval_seeds(self.lm.device), _no_progress_bars():
                for task in self.loaded["tasks"].values():
                    # The few-shot examples drawn are those of a fresh simple_evaluate, at every evaluation.
                    task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
                results = evaluate(lm=self.lm, task_dict=self.loaded, limit=self.limit, bootstrap_iters=0,
                                   log_samples=False)
        finally:
            self.model.train(was_training)
        return task_metrics(results)


def _set_fewshot(name: str, task: Any, num_fewshot: int | None) -> None:
    """What lm-eval's simple_evaluate does with num_fewshot: a task whose YAML says 0 keeps 0; null keeps
    each task's own number (0 where it has none)."""
    own = task.get_config("num_fewshot")
    if num_fewshot is not None and own != 0:
        if own is not None and own != num_fewshot:
            log.info("eval.tasks: %s runs with %d examples in its prompts (eval.tasks_num_fewshot), not its own %s",
                     name, num_fewshot, own)
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif own is None:
        task.set_config(key="num_fewshot", value=0)
