"""The MPT decoder, in the order data flows through it.

Pre-LN blocks with ALiBi attention, no biases, low-precision LayerNorm and logits through the tied
token embedding. The model never knows how it is parallelized: tensor parallelism, FSDP2, activation
checkpointing and torch.compile are applied from outside (mptlike.parallel) to `transformer.blocks`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mptlike.errors import MptlikeError
from mptlike.model.config import MPTConfig
from mptlike.model.init import init_weights
from mptlike.ops.alibi import alibi_slopes
from mptlike.ops.attention import attention
from mptlike.ops.layernorm import LPLayerNorm
from mptlike.ops.loss import cross_entropy

KV = tuple[torch.Tensor, torch.Tensor]
KVCache = list[KV]
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPE = "mptlike"


class Linear(nn.Linear):
    """nn.Linear without torch's default init: `init_weights()` sets every parameter, and skipping it
    keeps meta-device construction free of work (and of the import torch's meta init triggers)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without torch's default init (see Linear)."""

    def reset_parameters(self) -> None:
        pass


@dataclass
class MPTOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None


# A pytree node, so that code walking a module's outputs with torch's pytree finds the tensors inside:
# FSDP2 before torch 2.13 looks for the root module's outputs that way to all-gather its parameters
# (embeddings, the tied head) again for backward; as an opaque leaf, backward read freed storage.
torch.utils._pytree.register_dataclass(MPTOutput)


class MPTAttention(nn.Module):
    """Grouped-query attention with one fused Wqkv projection (MHA when kv_n_heads == n_heads)."""

    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.cfg = cfg
        kv_dim = cfg.kv_n_heads * cfg.head_dim
        self.Wqkv = Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=not cfg.no_bias)
        if cfg.qk_ln:
            self.q_ln = LPLayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=not cfg.no_bias)
            self.k_ln = LPLayerNorm(kv_dim, eps=cfg.norm_eps, bias=not cfg.no_bias)
        self.out_proj = Linear(cfg.d_model, cfg.d_model, bias=not cfg.no_bias)
        self.out_proj._is_residual = True
        self.softmax_scale = cfg.softmax_scale or 1.0 / math.sqrt(cfg.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        slopes: torch.Tensor | None,
        sequence_id: torch.Tensor | None,
        past: KV | None,
        use_cache: bool,
    ) -> tuple[torch.Tensor, KV | None]:
        cfg = self.cfg
        qkv = self.Wqkv(x)
        if cfg.clip_qkv is not None:
            qkv = qkv.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        # Widths from the output, not the config: under tensor parallelism (mptlike.parallel.tensor_parallel)
        # a rank's qkv holds only its own heads, q, k and v in the same n_heads : kv_n_heads proportion.
        kv_width = qkv.shape[-1] * cfg.kv_n_heads // (cfg.n_heads + 2 * cfg.kv_n_heads)
        q, k, v = qkv.split((qkv.shape[-1] - 2 * kv_width, kv_width, kv_width), dim=-1)
        if cfg.qk_ln:
            # The norms run in the autocast dtype; cast back so q, k, v share one dtype.
            q, k = self.q_ln(q).to(v.dtype), self.k_ln(k).to(v.dtype)
        batch, seq = x.shape[:2]
        q = q.view(batch, seq, -1, cfg.head_dim)
        k = k.view(batch, seq, -1, cfg.head_dim)
        v = v.view(batch, seq, -1, cfg.head_dim)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        out = attention(
            q,
            k,
            v,
            impl=cfg.attn_impl,
            softmax_scale=self.softmax_scale,
            alibi_slopes=slopes,
            sequence_id=sequence_id,
            dropout_p=cfg.attn_pdrop if self.training else 0.0,
        )
        # k and v are views of this layer's whole qkv projection: returned only for a KV cache, else
        # every layer's projection would stay alive until the loss (even with activation checkpointing).
        return self.out_proj(out.reshape(batch, seq, -1)), (k, v) if use_cache else None


class MPTMLP(nn.Module):
    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.up_proj = Linear(cfg.d_model, cfg.ffn_hidden_size, bias=not cfg.no_bias)
        self.act = nn.GELU(approximate="none")
        self.down_proj = Linear(cfg.ffn_hidden_size, cfg.d_model, bias=not cfg.no_bias)
        self.down_proj._is_residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MPTBlock(nn.Module):
    """The unit that FSDP2 shards and activation checkpointing wraps."""

    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.norm_1 = LPLayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=not cfg.no_bias)
        self.attn = MPTAttention(cfg)
        self.norm_2 = LPLayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=not cfg.no_bias)
        self.ffn = MPTMLP(cfg)
        self.resid_attn_dropout = nn.Dropout(cfg.resid_pdrop)
        self.resid_ffn_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        slopes: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        past: KV | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KV | None]:
        a, present = self.attn(self.norm_1(x), slopes, sequence_id, past, use_cache)
        x = x + self.resid_attn_dropout(a)
        x = x + self.resid_ffn_dropout(self.ffn(self.norm_2(x)))
        return x, present


class MPTModel(nn.Module):
    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.learned_pos_emb:
            self.wpe = Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_drop = nn.Dropout(cfg.emb_pdrop)
        self.blocks = nn.ModuleList(MPTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = LPLayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=not cfg.no_bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        sequence_id: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None]:
        cfg = self.cfg
        past_len = past_key_values[0][0].shape[1] if past_key_values else 0
        x = self.wte(input_ids)
        if cfg.learned_pos_emb:
            if past_len + input_ids.shape[1] > cfg.max_seq_len:
                raise MptlikeError(
                    f"sequence of {past_len + input_ids.shape[1]} tokens exceeds model.max_seq_len="
                    f"{cfg.max_seq_len} with learned positions: shorten the input or use alibi"
                )
            pos = torch.arange(past_len, past_len + input_ids.shape[1], device=input_ids.device)
            x = x + self.wpe(pos)
        if cfg.embedding_fraction < 1:
            x = x * cfg.embedding_fraction + x.detach() * (1 - cfg.embedding_fraction)
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # The residual stream runs in the compute dtype, as it does under FSDP2 (whose bf16
            # parameters make a bf16 embedding): one mix of precisions on one device or many.
            x = x.to(torch.get_autocast_dtype(device))
        x = self.emb_drop(x)
        # Slopes are n_heads numbers: recomputing them costs nothing and keeps the model free of
        # buffers that meta-device construction would have to materialize.
        slopes = alibi_slopes(cfg.n_heads, cfg.alibi_bias_max, device=x.device) if cfg.alibi else None
        presents: KVCache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, slopes, sequence_id, past_key_values[i] if past_key_values else None, use_cache)
            if use_cache:
                presents.append(present)
        return self.norm_f(x), presents if use_cache else None


class MPTForCausalLM(nn.Module):
    def __init__(self, config: MPTConfig):
        super().__init__()
        self.config = config
        self.transformer = MPTModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if not self.transformer.wte.weight.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialize every parameter in place from the config's scheme; works on shards."""
        init_weights(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> MPTOutput:
        """labels are next-token targets already aligned with input_ids (-100 = ignore)."""
        hidden, presents = self.transformer(input_ids, sequence_id, past_key_values, use_cache)
        weight = self.transformer.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(hidden, weight)
        if self.config.logit_scale is not None:
            scale = self.config.logit_scale
            logits = logits * (1 / math.sqrt(self.config.d_model) if scale == "inv_sqrt_d_model" else scale)
        loss = None
        if labels is not None:
            loss = cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))
        return MPTOutput(logits=logits, loss=loss, past_key_values=presents)

    def num_params(self) -> int:
        """All parameters, tied embeddings counted once (global sizes under FSDP2)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N + 12 * n_layers * d_model * seq_len (attention causal-unaware)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layers * cfg.d_model * seq_len

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        from mptlike.model.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors; each file appears whole or not at all."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = {"model_type": MODEL_TYPE, **self.config.to_dict()}
        _atomic_write(out / WEIGHTS_NAME, lambda path: save_file(state, path, metadata={"format": "pt"}))
        _atomic_write(out / CONFIG_NAME, lambda path: Path(path).write_text(json.dumps(config, indent=2) + "\n"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> MPTForCausalLM:
        from safetensors.torch import load_file

        folder = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise MptlikeError(f"{folder / name} is missing: pass a directory written by save_pretrained")
        values = json.loads((folder / CONFIG_NAME).read_text())
        if values.pop("model_type", None) != MODEL_TYPE:
            raise MptlikeError(
                f"{folder / CONFIG_NAME} is not an mptlike config: convert it with `mptlike-convert from-hf`"
            )
        config = MPTConfig.from_dict(values)
        with torch.device("meta"):
            model = cls(config)
        state = load_file(str(folder / WEIGHTS_NAME), device=str(device))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise MptlikeError(
                f"{folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME} (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}): save both from the same model"
            )
        model.load_state_dict(state, assign=True)
        return model


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a saved model is for sharing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
