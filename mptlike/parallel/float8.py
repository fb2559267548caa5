"""float8 training (torchao) applied to a model from the outside: the blocks' linear layers matmul in float8.

Each `Wqkv`, `out_proj`, `up_proj` and `down_proj` becomes a torchao `Float8Linear`: its inputs, weight and
output gradient are cast to float8 with dynamic scales right before each of the three matmuls (forward,
grad input, grad weight) and the results come back in the compute dtype (bf16). The weights themselves
stay fp32 parameters with the same names, so checkpoints, exports and `init_weights` see the model they
would without float8, and a run may resume with float8 switched on or off. The embedding and the tied
head stay in bf16, as torchtitan keeps its output layer: the logits are the most sensitive to precision.

Recipes (torchao's): `tensorwise` scales each tensor by one number, the fastest; `rowwise` scales each row,
closer to bf16 and slower. Under FSDP2, tensorwise weights can be all-gathered in float8 (half of bf16's
bytes): the scales are then computed for all weights at once after each optimizer step
(`precompute_scales_after_step`), one all-reduce instead of one per layer.

float8 matmuls (`torch._scaled_mm`) need a GPU of compute capability 8.9 or newer (Ada and Hopper: L4,
L40S, H100, H200; Blackwell); runs are refused elsewhere at plan time (`check_float8`). torchao is an
optional dependency (the `float8` extra), imported only when float8 is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mptlike.errors import MptlikeError

FLOAT8_RECIPES = ("tensorwise", "rowwise")
# The blocks' linear layers, by their names inside a block; never the embedding or the head.
FLOAT8_LAYERS = ("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")
FLOAT8_INSTALL_HINT = "pip install 'mptlike[float8]'"
MIN_CAPABILITY = (8, 9)  # torch._scaled_mm's float8 kernels: Ada (sm89), Hopper (sm90) and newer
FLOAT8_GPUS = "H100, H200, L40S, L4, B200 or another GPU of compute capability 8.9+"


def check_float8_recipe(recipe: str, all_gather: bool | None) -> None:
    """The combinations torchao accepts (called by ParallelPlan, while the config is validated)."""
    if recipe not in FLOAT8_RECIPES:
        raise MptlikeError(f"parallel.float8_recipe={recipe!r} is unknown: choose one of {', '.join(FLOAT8_RECIPES)}")
    if recipe == "rowwise" and all_gather:
        raise MptlikeError("parallel.float8_all_gather=true with parallel.float8_recipe=rowwise: torchao all-gathers "
                           "float8 weights with tensorwise scales only; use parallel.float8_recipe=tensorwise or "
                           "parallel.float8_all_gather=null")


def uses_float8_all_gather(recipe: str, all_gather: bool | None, *, sharded: bool) -> bool:
    """Whether FSDP2 gathers the converted weights in float8: null means yes for tensorwise."""
    return sharded and recipe == "tensorwise" and all_gather is not False


def cuda_device() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of this process's GPU, or None without CUDA: the one place the device is asked."""
    if not torch.cuda.is_available():
        return None
    # At plan time no device is set yet: this process's is its LOCAL_RANK's under a launcher.
    props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return props.name, (props.major, props.minor)


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    # torchao logs a warning for each C++ extension built for another torch or CUDA than this one's (the
    # float8 path is Python over torch._scaled_mm and needs none of them): keep them off the run's console.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _torchao_float8() -> Any:
    """torchao.float8, imported lazily: an optional dependency that a run without float8 never loads."""
    with _quiet_import():
        import torchao.float8

    return torchao.float8


def torchao_problem() -> str | None:
    """Why torchao's float8 training cannot be used here, or None."""
    try:
        float8 = _torchao_float8()
    except ImportError as exc:
        return f"torchao does not import here ({exc})"
    missing = [name for name in ("convert_to_float8_training", "Float8LinearConfig",
                                 "precompute_float8_dynamic_scale_for_fsdp") if not hasattr(float8, name)]
    if missing:
        return f"torchao {importlib.metadata.version('torchao')} lacks {', '.join(missing)}"
    return None


def check_float8(*, precision: str, accelerator: str) -> None:
    """Refuse, at plan time, a float8 run that cannot work here: no torchao, no CUDA, a GPU older than sm89,
    or a compute dtype other than bf16 (torchao's float8 matmuls return the activations' dtype, and rowwise
    scaling returns bf16 only)."""
    problem = torchao_problem()
    if problem:
        raise MptlikeError(f"parallel.float8=true needs torchao's float8 training, but {problem}: "
                           f"{FLOAT8_INSTALL_HINT}, or drop parallel.float8")
    device = cuda_device()
    if device is None:
        raise MptlikeError(f"parallel.float8=true needs a CUDA GPU ({FLOAT8_GPUS}) and none is visible: drop "
                           f"parallel.float8 to train in bf16 or fp32 here")
    name, capability = device
    if capability < MIN_CAPABILITY:
        raise MptlikeError(
            f"parallel.float8=true needs float8 matmuls, which the {name} (compute capability "
            f"{capability[0]}.{capability[1]}) lacks: use an {FLOAT8_GPUS}, or drop parallel.float8 to train in bf16")
    if precision != "bf16":
        raise MptlikeError(f"parallel.float8=true trains with bf16 outside the float8 matmuls, but trainer.precision "
                           f"resolves to {precision}: use trainer.precision=bf16 (or auto on a GPU)")
    if accelerator != "gpu":
        raise MptlikeError(f"parallel.float8=true with trainer.accelerator={accelerator}: float8 matmuls run on "
                           f"the GPU only; use trainer.accelerator=gpu (or auto)")


def float8_config(recipe: str, *, all_gather: bool = False) -> Any:
    """torchao's Float8LinearConfig for `recipe`, with float8 all-gather under FSDP2 (tensorwise only)."""
    check_float8_recipe(recipe, all_gather)
    config = _torchao_float8().Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=all_gather)


def _chosen(module: nn.Module, name: str) -> bool:
    """One of a block's FLOAT8_LAYERS, both of whose dimensions are multiples of 16 (torch._scaled_mm's
    requirement; a layer that is not stays in bf16)."""
    return (name in FLOAT8_LAYERS and isinstance(module, nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def apply_float8(blocks: Iterable[nn.Module], recipe: str, *, all_gather: bool = False) -> list[str]:
    """Swap each block's linear layers for torchao Float8Linear, in place; returns "<block>.<layer>" names.

    Call before activation checkpointing, compile and FSDP2 (they must wrap the float8 layers), on a model on
    any device, meta included. Parameter names, shapes and values are unchanged; what the model set on a layer
    (`_is_residual`, which `init_weights` reads) is carried over to its replacement.
    """
    float8 = _torchao_float8()
    config = float8_config(recipe, all_gather=all_gather)
    converted = []
    for index, block in enumerate(blocks):
        originals = {name: block.get_submodule(name) for name in FLOAT8_LAYERS}
        float8.convert_to_float8_training(block, config=config, module_filter_fn=_chosen)
        for name, old in originals.items():
            new = block.get_submodule(name)
            if new is old:
                continue
            for key, value in vars(old).items():
                if key not in vars(new):
                    setattr(new, key, value)
            converted.append(f"{index}.{name}")
    return converted


def precompute_scales_after_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> Callable[[], None] | None:
    """With float8 all-gather, compute every weight's float8 scale in one all-reduce after each optimizer step
    (FSDP2's next all-gather uses them) by a hook on `optimizer`. Returns the computation, to call again (on
    every rank) whenever the weights change otherwise, as a checkpoint load does; None when the model gathers
    no float8 weights."""
    from torch.distributed.tensor import DTensor

    with _quiet_import():
        from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    if not any(isinstance(p, DTensor) and isinstance(p._local_tensor, WeightWithDynamicFloat8CastTensor)
               for p in model.parameters()):
        return None
    precompute = _torchao_float8().precompute_float8_dynamic_scale_for_fsdp

    def refresh() -> None:
        precompute(model)

    optimizer.register_step_post_hook(lambda *_: refresh())
    return refresh
