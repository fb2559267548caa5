"""End of training: gather the weights once, write run_dir/final, and sample a few tokens from them.

The full state dict is assembled on rank 0 only (on CPU), so sharded models are never whole on
any GPU; the other ranks just take part in the gather.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mptlike.files import replace_dir
from mptlike.model import MPTForCausalLM
from mptlike.train.layout import FINAL
from mptlike.train.plan import RunPlan

log = logging.getLogger(__name__)



def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical parameter names and full tensors on CPU, on rank 0 (empty elsewhere when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    state = get_model_state_dict(model, options=options)
    return {k: v.detach().cpu() for k, v in state.items()}


def consolidated_model(state: dict[str, torch.Tensor], plan: RunPlan) -> MPTForCausalLM:
    with torch.device("meta"):
        model = MPTForCausalLM(plan.model_config)
    model.load_state_dict(state, assign=True)
    return model.eval()


def save_final(model: MPTForCausalLM, run_dir: Path) -> Path:
    """run_dir/final appears whole: written as final.tmp, then swapped in."""
    tmp = run_dir / (FINAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    return replace_dir(tmp, run_dir / FINAL)


def sample_text(model: MPTForCausalLM, plan: RunPlan) -> str:
    from mptlike.data.tokenizer import load_tokenizer

    s = plan.cfg.sample
    tokenizer = load_tokenizer(_tokenizer_spec(plan), str(plan.data.path))
    ids = tokenizer.encode(s.prompt) or [tokenizer.eos_id]
    generator = torch.Generator().manual_seed(plan.cfg.seed)
    out = model.generate(
        torch.tensor([ids]),
        s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    return tokenizer.decode(out[0].tolist())


def _tokenizer_spec(plan: RunPlan) -> str:
    from mptlike.data import Manifest

    return Manifest.load(plan.data.path).tokenizer


def export_and_sample(model: nn.Module, plan: RunPlan) -> tuple[Path | None, str | None]:
    """Collective. Returns (export folder, sample) on rank 0 and (None, None) elsewhere."""
    state = full_state_dict(model)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank != 0:
        return None, None
    full = consolidated_model(state, plan)
    export_dir = save_final(full, plan.run_dir) if plan.cfg.checkpoint.export_final else None
    text = None
    if plan.cfg.sample.max_new_tokens:
        text = sample_text(full, plan)
    return export_dir, text
