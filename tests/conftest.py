"""Session-wide test settings."""

import os

import torch

# Triton fixes interpreter mode when a kernel is decorated, i.e. when mptlike.ops.triton_attention
# is first imported, by whichever test gets there first. Without a GPU the kernels only run
# interpreted, so choose that before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
