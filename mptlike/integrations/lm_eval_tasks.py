"""Which lm-eval tasks to run: task names and task YAML files checked before any model is touched.

Shared by `mptlike-eval --tasks` (mptlike.cli.eval) and training's `eval.tasks` (mptlike.train.tasks).
Importing this module does not import lm-eval: a run or command without tasks never loads it.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mptlike.errors import MptlikeError, short_error

EVAL_EXTRA_HINT = "pip install 'mptlike[eval]'"

# Indexing lm-eval's built-in task files takes seconds; a training run resolves its tasks once while
# validating and again when it builds them, in the same process.
_RESOLVED: dict[tuple, tuple[list, Any]] = {}


def require_lm_eval(what: str) -> None:
    """MptlikeError naming the extra when lm-eval cannot be imported; `what` is the option that needs it."""
    try:
        found = importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # a broken or half-imported package
        found = False
    if not found:
        raise MptlikeError(
            f"{what} needs EleutherAI's lm-evaluation-harness, which is not installed: {EVAL_EXTRA_HINT}"
        )


def is_task_file(item: str) -> bool:
    return item.endswith((".yaml", ".yml"))


def task_file_config(path: Path) -> dict:
    """A task YAML as lm-eval reads it (includes merged, !function resolved next to the file)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise MptlikeError(f"task file {path} does not exist: pass an lm-eval task name or a task YAML file")
    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as exc:  # yaml, a missing include or a bad !function: all mean the file cannot be used
        detail = " ".join(str(exc).split())
        raise MptlikeError(
            f"task file {path} could not be read ({type(exc).__name__}: {detail[:300]}): fix the YAML"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("task") or config.get("group"), str):
        raise MptlikeError(f"task file {path} names no task (a 'task:' or 'group:' key): it is not an lm-eval task")
    return config


def resolve_tasks(
    items: Sequence[str],
    include_paths: Sequence[str],
    *,
    option: str = "--tasks",
    include_option: str = "--include-path",
) -> tuple[list, Any]:
    """The task list and lm-eval TaskManager for `items` (task or group names, globs, task YAML files).

    Unknown names and unreadable files are MptlikeErrors naming `option` / `include_option`, the
    caller's spelling of the two settings. Nothing is built yet: datasets load in `load_tasks`.
    """
    items = [str(item).strip() for item in items if str(item).strip()]
    if not items:
        raise MptlikeError(f"{option} is empty: name lm-eval tasks (e.g. hellaswag,lambada_openai) or task YAML files")
    key = (tuple(items), tuple(str(p) for p in include_paths), Path.cwd())
    if key in _RESOLVED:
        tasks, manager = _RESOLVED[key]
        return copy.deepcopy(tasks), manager  # building a task may change its config dict
    from lm_eval.tasks import TaskManager

    for folder in include_paths:
        if not Path(folder).is_dir():
            raise MptlikeError(f"{include_option} {folder} is not a folder of task YAMLs")
    files = [Path(item).expanduser().absolute() for item in items if is_task_file(item)]
    configs = {path: task_file_config(path) for path in files}
    names = [item for item in items if not is_task_file(item)]
    # Task files alone do not need lm-eval's index: they are loaded as given, from their own folders;
    # a group may name built-in tasks, so it does.
    paths = [str(p) for p in include_paths] + sorted({str(p.parent) for p in files})
    groups = any("group" in config for config in configs.values())
    manager = TaskManager(include_path=paths or None, include_defaults=bool(names) or groups or not files)
    tasks: list = []
    unknown = []
    for item in items:
        if is_task_file(item):
            tasks.append(configs[Path(item).expanduser().absolute()])
            continue
        found = manager.match_tasks([item])
        if not found:
            unknown.append(item)
        tasks += [name for name in found if name not in tasks]
    if unknown:
        raise MptlikeError(
            f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: see `lm-eval ls tasks` for "
            f"the names, or pass a task YAML file (or its folder with {include_option})"
        )
    _RESOLVED[key] = (copy.deepcopy(tasks), manager)
    return tasks, manager


def dataset_error(exc: BaseException) -> MptlikeError:
    """A task's dataset that is neither cached nor reachable (HF_DATASETS_OFFLINE=1 on a cluster, a wrong
    data_files path), as one line saying what to do."""
    detail = " ".join(str(exc).split())
    return MptlikeError(
        f"a task's dataset could not be loaded ({type(exc).__name__}: {detail[:300]}): download it where there "
        "is network (it is then cached), or point the task YAML's dataset_kwargs.data_files at local files"
    )


def load_tasks(tasks: list, manager: Any, *, option: str = "--tasks") -> dict:
    """lm-eval's {"tasks": {name: Task}, "groups": ..., "group_map": ...}, datasets loaded."""
    if not hasattr(manager, "load"):
        import lm_eval

        raise MptlikeError(f"{option} needs a newer lm-eval 0.4 release (one whose TaskManager has load(); 0.4.13 "
                           f"is tested) than {getattr(lm_eval, '__version__', 'this one')}: pip install -U "
                           f"'lm-eval>=0.4.13,<0.5'")
    try:
        return manager.load(tasks)
    except (FileNotFoundError, ConnectionError) as exc:
        raise dataset_error(exc) from None
    except MptlikeError:
        raise
    except (ValueError, KeyError, TypeError) as exc:  # a task YAML lm-eval cannot build (bad keys or values)
        raise MptlikeError(
            f"{option}: lm-eval cannot build the tasks ({short_error(exc)}): fix the task YAML"
        ) from None
