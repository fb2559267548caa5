"""End of training: sample a few tokens from the trained model, gather the weights once, write run_dir/final.

The sample comes from the training model itself, on the training device, in the loop's precision
and with its attention backend: every rank takes part (a sharded forward is collective) and runs
the same number of forward passes. Only the export rebuilds the model, on rank 0 and on CPU, where
it is written and never run: sharded models are never whole on any GPU, and a GPU-only attention
backend (triton, flash) never meets a CPU tensor.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mptlike.errors import MptlikeError
from mptlike.files import replace_dir
from mptlike.model import MPTForCausalLM
from mptlike.model.generation import generate
from mptlike.parallel.tensor_parallel import full_state_to_canonical
from mptlike.train.layout import FINAL
from mptlike.train.plan import RunPlan

log = logging.getLogger(__name__)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical parameter names and full tensors on CPU, on rank 0 (empty elsewhere when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    state = full_state_to_canonical(model, get_model_state_dict(model, options=options))  # Wqkv in MPT's order
    return {k: v.detach().cpu() for k, v in state.items()}


def consolidated_model(state: dict[str, torch.Tensor], plan: RunPlan) -> MPTForCausalLM:
    # The config as the user wrote it (attn_impl=auto stays auto, to be resolved where it is loaded).
    with torch.device("meta"):
        model = MPTForCausalLM(plan.cfg.model)
    model.load_state_dict(state, assign=True)
    return model.eval()


def save_final(model: MPTForCausalLM, run_dir: Path) -> Path:
    """run_dir/final appears whole: written as final.tmp, then swapped in. A full disk removes the
    .tmp and raises the one-line error; the same command run again finishes the export."""
    tmp = run_dir / (FINAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise MptlikeError(
            f"disk full while writing the final weights {run_dir / FINAL}: free space on that disk, then run the "
            f"same command again: it finishes the export from the last checkpoint, which holds the trained weights"
        ) from None
    return replace_dir(tmp, run_dir / FINAL)


def loop_precision(plan: RunPlan, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast the loop's steps run under: Fabric's bf16-mixed on one device; under FSDP2 the
    parameters are gathered in the compute dtype already, so nothing more."""
    if plan.precision.lightning == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sample_text(model: nn.Module, plan: RunPlan) -> str:
    """Collective under FSDP2: call it on every rank. Decoded on every rank; rank 0's is reported."""
    from mptlike.data.tokenizer import load_tokenizer

    s = plan.cfg.sample
    device = next(model.parameters()).device
    tokenizer = load_tokenizer(_tokenizer_spec(plan), str(plan.data.path))
    ids = tokenizer.encode(s.prompt) or [tokenizer.eos_id]
    generator = torch.Generator(device=device).manual_seed(plan.cfg.seed)
    # No early stop at EOS: a rank whose sample ended would leave the others' all-gathers waiting.
    # Every rank runs max_new_tokens forward passes; the text is cut after the first EOS instead.
    with loop_precision(plan, device):
        out = generate(model, torch.tensor([ids], device=device), s.max_new_tokens, temperature=s.temperature,
                       top_k=s.top_k, generator=generator)
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id) + 1]
    return tokenizer.decode(ids + new)


def _tokenizer_spec(plan: RunPlan) -> str:
    from mptlike.data import Manifest

    return Manifest.load(plan.data.path).tokenizer


def export_and_sample(model: nn.Module, plan: RunPlan) -> tuple[Path | None, str | None]:
    """Collective. Returns (export folder, sample) on rank 0 and (None, None) elsewhere."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    text = sample_text(model, plan) if plan.cfg.sample.max_new_tokens else None
    export_dir = None
    if plan.cfg.checkpoint.export_final:
        state = full_state_dict(model)
        if rank == 0:
            export_dir = save_final(consolidated_model(state, plan), plan.run_dir)
    if rank != 0:
        return None, None
    return export_dir, text
