"""The MPT network, plain PyTorch: config, presets, modules, init and generation."""

from mptlike.model.config import MPTConfig
from mptlike.model.mpt import MPTBlock, MPTForCausalLM, MPTOutput
from mptlike.model.presets import PRESETS

__all__ = ["MPTBlock", "MPTConfig", "MPTForCausalLM", "MPTOutput", "PRESETS"]
