"""`trainer.backend=composer`: MosaicML Composer drives the loop, with mptlike's model, data and components.

    checkpoints.py  torch only: refuse what Composer cannot do, find and read Composer checkpoints
                    (`build_plan` and `mptlike-convert` use it in either environment)
    model.py        ComposerMPT, MPTForCausalLM as a ComposerModel
    data.py         our resumable loader and validation split as Composer data
    callbacks.py    the step (guard, faults, clipping), metrics, preemption and run info as Callbacks
    backend.py      build_composer_trainer and `fit(plan)`, which mptlike.train.run calls

Composer lives in its own environment (torch 2.6-2.7): importing this package imports no Composer;
the names below load the modules that do on first use, so
`from mptlike.integrations.composer import ComposerMPT, build_composer_trainer` keeps working.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ComposerMPT": "model",
    "composer_dataloader": "data",
    "build_composer_trainer": "backend",
    "fit": "backend",
    "trained_model": "backend",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_LAZY)
