"""A stand-in for a GPU-only attention backend on a CPU machine, for end-of-run tests.

`install()` replaces the `triton` backend with sdpa that refuses to run outside the forward of the
model that training built: that model stands for the one on the GPU, anything else (a copy
rebuilt on CPU) gets the error the real kernel gives on CPU tensors. Every call records q's dtype
and whether gradients were on, so a test can check the precision of each phase.

Run as a script, it installs the stand-in and then runs mptlike-train with the arguments given
(for torchrun: `torchrun ... tests/gpu_only_attention.py OVERRIDES...`).
"""

import importlib
import sys

import torch

from mptlike.errors import MptlikeError
from mptlike.train import loop

attention_module = importlib.import_module("mptlike.ops.attention")

CALLS: list[tuple[bool, torch.dtype]] = []  # (grad enabled, q dtype) of every accepted call
_inside_training_model = [0]


def gpu_only_attention(q, k, v, scale, slopes, sequence_id, dropout_p):
    if not _inside_training_model[0]:
        raise MptlikeError(
            f"model.attn_impl=triton runs on CUDA tensors, not {q.device.type}; use a GPU, model.attn_impl=sdpa, "
            "or set TRITON_INTERPRET=1 before the first call to run the kernels (slowly) on CPU."
        )
    CALLS.append((torch.is_grad_enabled(), q.dtype))
    return attention_module._BACKENDS["sdpa"](q, k, v, scale, slopes, sequence_id, dropout_p)


def _enter(*_):
    _inside_training_model[0] += 1


def _leave(*_):
    _inside_training_model[0] -= 1


def install(setattr_=setattr, setitem=None) -> None:
    """Patch mptlike (with pytest's monkeypatch.setattr / setitem when given, so it is undone)."""
    build_model = loop.build_model

    def build_and_mark(plan, fabric):
        model = build_model(plan, fabric)
        model.register_forward_pre_hook(_enter)
        model.register_forward_hook(_leave)
        return model

    setattr_(loop, "build_model", build_and_mark)
    if setitem is None:
        attention_module._BACKENDS["triton"] = gpu_only_attention
    else:
        setitem(attention_module._BACKENDS, "triton", gpu_only_attention)


if __name__ == "__main__":
    from mptlike.train.cli import main

    install()
    sys.exit(main(sys.argv[1:]))
