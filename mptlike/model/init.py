"""Parameter initialization schemes, as llm-foundry's MPT defines them.

`init_weights(model)` rewrites every parameter in place, so it works on a model that was built on
the meta device and materialized with `to_empty()`, including FSDP2-sharded DTensor parameters
(each rank draws only its own shard: the distribution is right, the exact sample depends on the
sharding). Residual projections (`attn.out_proj`, `ffn.down_proj`, marked `_is_residual`) have their
std divided by `config.residual_divisor`.

Wqkv is one fused matrix. llm-foundry initializes its q, k and v slices separately; for the fan_in
schemes here that is the same distribution as initializing the whole matrix (every slice has
fan_in = d_model), so no slicing is needed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mptlike.model.config import MPTConfig


def linear_std(cfg: MPTConfig, fan_in: int) -> float:
    """Standard deviation of a (non-residual) weight with this fan-in under the configured scheme."""
    if cfg.init_name in ("kaiming_normal_", "kaiming_uniform_"):
        return nn.init.calculate_gain(cfg.init_nonlinearity) / math.sqrt(fan_in)
    if cfg.init_name in ("small_init_", "neox_init_"):
        # Nguyen & Salazar (2019): std = sqrt(2 / (5 d)), d the model width.
        return math.sqrt(2 / (5 * cfg.d_model))
    return cfg.init_std


def _fill(weight: torch.Tensor, cfg: MPTConfig, std: float) -> None:
    if cfg.init_name == "kaiming_uniform_":
        bound = math.sqrt(3.0) * std  # a uniform with this bound has this std
        nn.init.uniform_(weight, -bound, bound)
    else:
        nn.init.normal_(weight, mean=0.0, std=std)


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    cfg: MPTConfig = model.config
    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = linear_std(cfg, module.in_features)
            if getattr(module, "_is_residual", False):
                std /= cfg.residual_divisor
            _fill(module.weight, cfg, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init_embedding(module.weight, cfg)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _init_embedding(weight: torch.Tensor, cfg: MPTConfig) -> None:
    if cfg.emb_init_std is not None:
        nn.init.normal_(weight, mean=0.0, std=cfg.emb_init_std)
    elif cfg.emb_init_uniform_lim is not None:
        lim = cfg.emb_init_uniform_lim
        low, high = (-lim, lim) if isinstance(lim, (int, float)) else lim
        nn.init.uniform_(weight, low, high)
    else:
        # As llm-foundry: the linear scheme with the embedding's fan-in (its width, d_model).
        _fill(weight, cfg, linear_std(cfg, weight.shape[1]))
