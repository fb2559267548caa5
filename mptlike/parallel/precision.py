"""One precision setting, two mechanisms: autocast on one device, FSDP2's MixedPrecisionPolicy when sharded.

With FSDP2 the sharded parameters stay fp32 (the optimizer's master copy); each all-gather casts
them to `param_dtype`, so every block computes in bf16, and gradients are reduce-scattered in
`reduce_dtype` (fp32 by default: summing many ranks' bf16 gradients loses bits). On one device
there is nothing to gather, so autocast gives the same bf16 compute over fp32 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mptlike.errors import MptlikeError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ALIASES = {
    "fp32": "fp32",
    "32": "fp32",
    "32-true": "fp32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "amp_bf16": "bf16",
}


@dataclass(frozen=True)
class PrecisionPlan:
    name: str  # fp32 | bf16
    lightning: str  # the Lightning Trainer's precision flag
    param_dtype: torch.dtype | None  # FSDP2 compute dtype (None: keep the parameters' fp32)
    reduce_dtype: torch.dtype | None

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32


def canonical_precision(value: str, cuda: bool) -> str:
    """fp32 or bf16 from the user's spelling; auto picks bf16 on a bf16-capable GPU."""
    if value == "auto":
        return "bf16" if cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if value in ("fp16", "16", "16-mixed", "amp_fp16"):
        raise MptlikeError(
            f"trainer.precision={value} is not supported (fp16 needs loss scaling): use trainer.precision=bf16 or fp32"
        )
    if value not in _ALIASES:
        raise MptlikeError(
            f"trainer.precision={value!r} is unknown: choose auto, fp32 or bf16 (also accepted: 32-true, bf16-mixed)"
        )
    return _ALIASES[value]


def _dtype(key: str, value: str) -> torch.dtype:
    if value not in DTYPES:
        raise MptlikeError(f"parallel.{key}={value!r} is unknown: choose one of {', '.join(DTYPES)}")
    return DTYPES[value]


def resolve_precision(
    precision: str, *, cuda: bool, sharded: bool, param_dtype: str = "auto", reduce_dtype: str = "fp32"
) -> PrecisionPlan:
    name = canonical_precision(precision, cuda)
    reduce = _dtype("reduce_dtype", reduce_dtype)
    if not sharded:
        return PrecisionPlan(name, "bf16-mixed" if name == "bf16" else "32-true", None, None)
    params = DTYPES[name] if param_dtype == "auto" else _dtype("param_dtype", param_dtype)
    # Lightning's own mixed precision does not reach inside FSDP2 modules; the policy does it all.
    return PrecisionPlan(name, "32-true", None if params == torch.float32 else params, reduce)
