"""`MPTForCausalLM` as a ComposerModel: the loss, the validation metrics, FLOPs and the FSDP2 hooks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torch import nn

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.model.init import init_weights
from mptlike.ops.loss import cross_entropy

CE_METRIC, PPL_METRIC = "LanguageCrossEntropy", "LanguagePerplexity"


class ComposerMPT(ComposerModel):
    """`MPTForCausalLM` as a ComposerModel; its parameters appear under `model.` in Composer's state."""

    def __init__(self, model: MPTForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.config: MPTConfig = model.config
        # A parameter-free twin on the meta device keeps FLOP counting in MPTForCausalLM (one formula)
        # and global parameter counts, whatever sharding does to the real parameters later.
        with torch.device("meta"):
            twin = MPTForCausalLM(model.config)
        self.flops_per_token = twin.flops_per_token
        # Composer looks these hooks up on the wrapped child module (FSDP wrapping and meta init).
        model.fsdp_wrap_fn = self.fsdp_wrap_fn
        model.param_init_fn = self.param_init_fn

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], sequence_id=batch.get("sequence_id")).logits

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model's own loss: mean next-token cross-entropy against the already-shifted labels."""
        return cross_entropy(outputs.reshape(-1, outputs.shape[-1]), batch["labels"].reshape(-1))

    def eval_forward(self, batch: Mapping[str, torch.Tensor], outputs: Any = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool) -> dict[str, Any]:
        # Training metrics would cost a second cross-entropy pass over the logits every step; the
        # training loss is already logged.
        if is_train:
            return {}
        return {CE_METRIC: LanguageCrossEntropy(), PPL_METRIC: LanguagePerplexity()}

    def update_metric(self, batch: Mapping[str, torch.Tensor], outputs: torch.Tensor, metric: Any) -> None:
        metric.update(outputs.float(), batch["labels"])

    def flops_per_batch(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Training FLOPs of one batch (for Composer's SpeedMonitor, if a user adds it): per token x tokens."""
        input_ids = batch["input_ids"]
        return self.flops_per_token(input_ids.shape[-1]) * input_ids.numel()

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Shard every block (or its activation-checkpointing wrapper) as one FSDP unit."""
        return any(module is block for block in self.model.transformer.blocks)

    def param_init_fn(self, module: nn.Module) -> None:
        """Initialize the parameters held directly by `module` with the config's scheme (meta init)."""
        init_weights(_OneModule(self.config, module))


class _OneModule:
    """Presents one module to `init_weights`, which walks `.modules()` and reads `.config`."""

    def __init__(self, config: MPTConfig, module: nn.Module) -> None:
        self.config = config
        self._module = module

    def modules(self) -> Iterator[nn.Module]:
        yield self._module
