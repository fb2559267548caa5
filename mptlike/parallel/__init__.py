"""Parallelism applied to a model from the outside: the device mesh, tensor/sequence parallelism, FSDP2/HSDP,
activation checkpointing, compile, float8 training, init."""

from mptlike.parallel.float8 import FLOAT8_RECIPES, apply_float8
from mptlike.parallel.materialize import INIT_MODES, materialize, resolve_init_mode
from mptlike.parallel.mesh import MeshPlan, build_mesh, resolve_mesh
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
from mptlike.parallel.tensor_parallel import apply_tensor_parallel

__all__ = [
    "AC_MODES",
    "DTYPES",
    "FLOAT8_RECIPES",
    "INIT_MODES",
    "MeshPlan",
    "ParallelPlan",
    "PrecisionPlan",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_float8",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_mesh",
    "is_sharded",
    "materialize",
    "model_blocks",
    "parallelize",
    "resolve_init_mode",
    "resolve_mesh",
    "resolve_precision",
    "unwrapped_name",
]
