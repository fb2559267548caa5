"""Session-wide test settings."""

import os

import torch

# Triton fixes interpreter mode when a kernel is decorated, i.e. when mptlike.ops.triton_attention
# is first imported, by whichever test gets there first. Without a GPU the kernels only run
# interpreted, so choose that before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# W&B's environment variables change the composed config (logger.*): a developer's or a CI machine's
# own settings must not change what the tests compose. Tests that exercise them set them themselves.
for _var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_DIR"):
    os.environ.pop(_var, None)
