"""Parallelism applied to a model from the outside: FSDP2, activation checkpointing, compile, init."""

from mptlike.parallel.materialize import INIT_MODES, materialize, resolve_init_mode
from mptlike.parallel.parallelize import (
    AC_MODES,
    ParallelPlan,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    is_sharded,
    model_blocks,
    parallelize,
    unwrapped_name,
)
from mptlike.parallel.precision import DTYPES, PrecisionPlan, resolve_precision

__all__ = [
    "AC_MODES",
    "DTYPES",
    "INIT_MODES",
    "ParallelPlan",
    "PrecisionPlan",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "is_sharded",
    "materialize",
    "model_blocks",
    "parallelize",
    "resolve_init_mode",
    "resolve_precision",
    "unwrapped_name",
]
