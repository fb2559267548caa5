"""MPTConfig: every number that defines an MPT network, validated once at the edge.

Field names follow llm-foundry's MPT config (flattened: `attn_config` and `init_config` keys live at
the top level) so published configs map onto ours by name. Inner code trusts a constructed config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mptlike.errors import MptlikeError
from mptlike.model.presets import PRESETS
from mptlike.ops.attention import ATTN_CHOICES

INIT_NAMES = ("kaiming_normal_", "kaiming_uniform_", "baseline_", "small_init_", "neox_init_")
INIT_NONLINEARITIES = ("relu", "linear", "leaky_relu", "tanh", "selu")


def _fail(key: str, value: Any, fix: str) -> None:
    raise MptlikeError(f"model.{key}={value!r} is invalid: {fix}")


@dataclass
class MPTConfig:
    # Shape of the network.
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: float = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    norm_eps: float = 1e-5
    no_bias: bool = True
    tie_word_embeddings: bool = True
    # None, a positive float, or "inv_sqrt_d_model" (logits multiplied by 1/sqrt(d_model)).
    logit_scale: Any = None
    learned_pos_emb: bool = False
    # Regularization. embedding_fraction < 1 scales the gradient reaching the embeddings (GLM-130B trick).
    emb_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    embedding_fraction: float = 1.0
    # Attention.
    alibi: bool = True
    alibi_bias_max: float = 8
    kv_n_heads: int | None = None  # None: multi-head; 1: multi-query; otherwise grouped-query
    qk_ln: bool = False
    clip_qkv: float | None = None
    softmax_scale: float | None = None  # None: 1/sqrt(head_dim)
    # auto: the fastest correct backend on the device it runs on (mptlike.ops.attention.resolve_attn_impl:
    # triton on CUDA when installed, else flex, else sdpa; sdpa on CPU), or one of torch | sdpa | flex | flash | triton.
    attn_impl: str = "auto"
    attn_uses_sequence_id: bool = False  # packed documents do not attend across EOS boundaries
    # Initialization (llm-foundry's init_config).
    init_name: str = "kaiming_normal_"
    init_std: float = 0.02  # for baseline_
    init_nonlinearity: str = "relu"  # gain for the kaiming schemes, fan_in mode
    init_div_is_residual: Any = True  # True: residual projections / sqrt(2 * n_layers); or a number
    emb_init_std: float | None = None
    emb_init_uniform_lim: Any = None  # a float (symmetric) or [low, high]

    def __post_init__(self) -> None:
        for key in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(key, value, "use a positive integer")
        if not isinstance(self.expansion_ratio, (int, float)) or self.expansion_ratio <= 0:
            _fail("expansion_ratio", self.expansion_ratio, "use a positive number such as 4")
        if int(self.d_model * self.expansion_ratio) < 1:
            _fail("expansion_ratio", self.expansion_ratio, "d_model * expansion_ratio must be at least 1")
        if self.d_model % self.n_heads:
            raise MptlikeError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: "
                f"choose d_model as a multiple of n_heads (head_dim = d_model / n_heads)"
            )
        if self.kv_n_heads is None:
            self.kv_n_heads = self.n_heads
        if (
            isinstance(self.kv_n_heads, bool)
            or not isinstance(self.kv_n_heads, int)
            or not 1 <= self.kv_n_heads <= self.n_heads
            or self.n_heads % self.kv_n_heads
        ):
            _fail(
                "kv_n_heads",
                self.kv_n_heads,
                f"use a divisor of n_heads={self.n_heads} (1 for multi-query, n_heads for multi-head)",
            )
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            _fail("norm_eps", self.norm_eps, "use a small positive number such as 1e-5")
        for key in ("emb_pdrop", "resid_pdrop", "attn_pdrop"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                _fail(key, value, "a dropout probability must be in [0, 1)")
        if not (isinstance(self.embedding_fraction, (int, float)) and 0 < self.embedding_fraction <= 1):
            _fail("embedding_fraction", self.embedding_fraction, "use a number in (0, 1]")
        if self.logit_scale is not None and self.logit_scale != "inv_sqrt_d_model":
            if isinstance(self.logit_scale, str) or not self.logit_scale > 0:
                _fail("logit_scale", self.logit_scale, "use null, a positive number or 'inv_sqrt_d_model'")
        if not self.alibi_bias_max > 0:
            _fail("alibi_bias_max", self.alibi_bias_max, "use a positive number (MPT uses 8)")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            _fail("clip_qkv", self.clip_qkv, "use null or a positive number such as 8")
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            _fail("softmax_scale", self.softmax_scale, "use null (1/sqrt(head_dim)) or a positive number")
        if self.attn_impl not in ATTN_CHOICES:
            _fail("attn_impl", self.attn_impl, f"choose one of {', '.join(ATTN_CHOICES)}")
        if self.init_name not in INIT_NAMES:
            _fail("init_name", self.init_name, f"choose one of {', '.join(INIT_NAMES)}")
        if self.init_nonlinearity not in INIT_NONLINEARITIES:
            _fail("init_nonlinearity", self.init_nonlinearity, f"choose one of {', '.join(INIT_NONLINEARITIES)}")
        if not self.init_std > 0:
            _fail("init_std", self.init_std, "use a positive standard deviation such as 0.02")
        div = self.init_div_is_residual
        if not isinstance(div, bool) and not (isinstance(div, (int, float)) and div > 0):
            _fail("init_div_is_residual", div, "use true, false or a positive divisor")
        if self.emb_init_std is not None and not self.emb_init_std > 0:
            _fail("emb_init_std", self.emb_init_std, "use null or a positive standard deviation")
        lim = self.emb_init_uniform_lim
        if lim is not None:
            pair = list(lim) if isinstance(lim, (list, tuple)) else None
            if not (isinstance(lim, (int, float)) and lim > 0) and not (pair and len(pair) == 2 and pair[0] < pair[1]):
                _fail("emb_init_uniform_lim", lim, "use null, a positive limit, or [low, high] with low < high")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        return int(self.d_model * self.expansion_ratio)

    @property
    def residual_divisor(self) -> float:
        """What the residual projections' init std is divided by (1.0 when off)."""
        if self.init_name == "neox_init_":
            return self.n_layers / math.sqrt(10)
        div = self.init_div_is_residual
        if div is True:
            return math.sqrt(2 * self.n_layers)
        if div is False:
            return 1.0
        return float(div)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MPTConfig:
        known = [f.name for f in dataclasses.fields(cls)]
        for key, value in values.items():
            if key not in known:
                _fail(key, value, "it is not an MPTConfig key; see conf/model/mpt-tiny.yaml for the keys")
        kwargs = dict(values)
        if isinstance(kwargs.get("emb_init_uniform_lim"), tuple):
            kwargs["emb_init_uniform_lim"] = list(kwargs["emb_init_uniform_lim"])
        return cls(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MPTConfig:
        if name not in PRESETS:
            raise MptlikeError(f"model preset {name!r} is unknown: choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})
