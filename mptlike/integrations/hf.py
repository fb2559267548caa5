"""Our MPT and Hugging Face's MPT describe one network; this maps each description onto the other.

Two published layouts share `model_type: "mpt"`:
- transformers' native `MptForCausalLM` (no remote code): multi-head attention with ALiBi slopes
  for bias max 8, a GELU MLP of 4 * d_model, no biases anywhere, optionally an untied lm_head.
- llm-foundry's MPT (`llmfoundry.models.mpt.MPTForCausalLM`, the `trust_remote_code` model of
  mosaicml/mpt-7b): `attn_config`, `init_config` and `ffn_config` dictionaries that also cover
  GQA/MQA, qk_ln, biases, learned positions and logit scaling. Read: the 2023 shape of mpt-7b and
  everything llm-foundry 0.22's `save_pretrained` writes; written: a config llm-foundry 0.22 loads.
Parameter names are the same in both and in ours (`transformer.blocks.N.attn.Wqkv.weight`, ...),
so weights move without a renaming table. Pure functions: no file access.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from mptlike.errors import MptlikeError
from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.model.config import INIT_NAMES, INIT_NONLINEARITIES

log = logging.getLogger(__name__)

MODEL_TYPE = "mpt"
NATIVE_ARCHITECTURE = "MptForCausalLM"
REMOTE_ARCHITECTURE = "MPTForCausalLM"
# Where llm-foundry's exported folders point transformers for the config and model classes.
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_mpt.MPTConfig",
    "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
}
TRANSFORMERS = "transformers"
LLM_FOUNDRY = "llm-foundry"
# transformers builds its ALiBi tensor with the default bias max.
TRANSFORMERS_ALIBI_BIAS_MAX = 8
# llm-foundry's default norm eps. Its blocks pass the config's norm_eps to norm_1, norm_2 and norm_f
# only: the qk_ln norms take attn_config's norm_eps (every attn_config key reaches the attention class).
FOUNDRY_NORM_EPS = 1e-5
FOUNDRY_ATTN_IMPL = "torch"  # the attention implementation llm-foundry runs on any device (flash needs CUDA)
_ATTN_TYPES = {"multihead_attention", "multiquery_attention", "grouped_query_attention"}
_NORM_TYPES = {"low_precision_layernorm", "layernorm"}
# Keys the block sets itself inside an fc_type dictionary; any other key would change the layers.
_FC_TYPE_OVERRIDDEN = {"name", "bias", "device"}


@dataclass(frozen=True)
class HFModelInfo:
    """What a Hugging Face MPT config.json says, in our terms."""

    config: MPTConfig
    layout: str  # TRANSFORMERS or LLM_FOUNDRY
    fused_qkv: bool = True  # False: llm-foundry stored Wq, Wk, Wv separately
    eos_token_id: int | None = None


# ---- ours -> Hugging Face ---------------------------------------------------------------------


def transformers_gaps(cfg: MPTConfig) -> list[str]:
    """Features of `cfg` that transformers' MptForCausalLM cannot run (empty when it can)."""
    gaps = []
    if cfg.kv_n_heads != cfg.n_heads:
        kind = "multi-query" if cfg.kv_n_heads == 1 else "grouped-query"
        gaps.append(f"{kind} attention (kv_n_heads={cfg.kv_n_heads}, n_heads={cfg.n_heads})")
    if cfg.qk_ln:
        gaps.append("qk_ln=true")
    if cfg.expansion_ratio != 4:
        gaps.append(f"expansion_ratio={cfg.expansion_ratio} (transformers fixes 4)")
    if cfg.logit_scale is not None:
        gaps.append(f"logit_scale={cfg.logit_scale!r}")
    if cfg.learned_pos_emb:
        gaps.append("learned_pos_emb=true")
    if not cfg.alibi:
        gaps.append("alibi=false (transformers always applies ALiBi)")
    elif cfg.alibi_bias_max != TRANSFORMERS_ALIBI_BIAS_MAX:
        gaps.append(f"alibi_bias_max={cfg.alibi_bias_max} (transformers fixes {TRANSFORMERS_ALIBI_BIAS_MAX})")
    if not cfg.no_bias:
        gaps.append("no_bias=false (transformers' MPT has no biases)")
    return gaps


def foundry_gaps(cfg: MPTConfig) -> list[str]:
    """Features of `cfg` that llm-foundry's MPT cannot express."""
    if cfg.learned_pos_emb and cfg.alibi:
        return ["learned_pos_emb=true with alibi=true (llm-foundry drops learned positions whenever ALiBi is on)"]
    return []


def _same_eps(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def _int_if_integral(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _init_config(cfg: MPTConfig) -> dict[str, Any]:
    return {
        "name": cfg.init_name,
        "init_std": cfg.init_std,
        "init_div_is_residual": cfg.init_div_is_residual,
        "emb_init_std": cfg.emb_init_std,
        "emb_init_uniform_lim": cfg.emb_init_uniform_lim,
        "init_nonlinearity": cfg.init_nonlinearity,
        "fan_mode": "fan_in",
        "init_gain": 0.0,
    }


def to_hf_config(
    cfg: MPTConfig,
    *,
    remote_code: bool = False,
    dtype: str = "float32",
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """config.json for transformers' native MPT, or (remote_code) for llm-foundry's trust_remote_code MPT.

    Raises one MptlikeError listing every feature the chosen target cannot represent.
    """
    if remote_code:
        gaps = foundry_gaps(cfg)
        if gaps:
            raise MptlikeError(
                f"the model uses features llm-foundry's MPT cannot express: {'; '.join(gaps)}; "
                "keep it in mptlike's format or retrain without them"
            )
        return _foundry_config(cfg, dtype, eos_token_id)
    gaps = transformers_gaps(cfg)
    if gaps:
        raise MptlikeError(
            f"the model uses features transformers' MptForCausalLM lacks: {'; '.join(gaps)}; "
            "export llm-foundry's trust_remote_code layout instead (mptlike-convert to-hf --remote-code)"
        )
    if cfg.attn_pdrop:
        # transformers types attn_pdrop as int; dropout changes no weight, so inference loses nothing.
        log.warning("attn_pdrop=%s is written as 0: transformers' MptConfig only accepts an integer", cfg.attn_pdrop)
    values: dict[str, Any] = {
        "architectures": [NATIVE_ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_layers": cfg.n_layers,
        "expansion_ratio": 4,
        "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.norm_eps,
        "no_bias": True,
        "learned_pos_emb": False,
        "logit_scale": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "emb_pdrop": float(cfg.emb_pdrop),
        "resid_pdrop": float(cfg.resid_pdrop),
        "embedding_fraction": float(cfg.embedding_fraction),
        "norm_type": "low_precision_layernorm",
        "init_device": "cpu",
        "use_cache": True,
        "attn_config": {
            "attn_type": "multihead_attention",
            "attn_pdrop": 0,
            "attn_impl": "torch",
            "clip_qkv": _optional_float(cfg.clip_qkv),
            "softmax_scale": _optional_float(cfg.softmax_scale),
            "prefix_lm": False,
            "qk_ln": False,
            "attn_uses_sequence_id": cfg.attn_uses_sequence_id,
            "alibi": True,
            "alibi_bias_max": TRANSFORMERS_ALIBI_BIAS_MAX,
        },
        # Not read by transformers; kept so a later from-hf restores the training init scheme.
        "init_config": _init_config(cfg),
        "dtype": dtype,
    }
    if eos_token_id is not None:
        values["eos_token_id"] = eos_token_id
    return values


def _foundry_config(cfg: MPTConfig, dtype: str, eos_token_id: int | None) -> dict[str, Any]:
    """Only keys llm-foundry 0.22 reads; what is left out takes its defaults.

    Every attn_config key is passed on to llm-foundry's attention class as a keyword argument, and its
    multi-head and multi-query classes take no kv_n_heads (nor any class a prefix_lm): a stray key is
    a TypeError when the model is built.
    """
    attn_config: dict[str, Any] = {"attn_type": "multihead_attention"}
    if cfg.kv_n_heads == 1 and cfg.n_heads > 1:
        attn_config["attn_type"] = "multiquery_attention"
    elif cfg.kv_n_heads != cfg.n_heads:
        attn_config.update(attn_type="grouped_query_attention", kv_n_heads=cfg.kv_n_heads)
    attn_config.update(
        attn_pdrop=cfg.attn_pdrop,
        attn_impl=FOUNDRY_ATTN_IMPL,
        fused_qkv=True,
        qk_ln=cfg.qk_ln,
        clip_qkv=cfg.clip_qkv,
        softmax_scale=cfg.softmax_scale,
        attn_uses_sequence_id=cfg.attn_uses_sequence_id,
        alibi=cfg.alibi,
        alibi_bias_max=_int_if_integral(cfg.alibi_bias_max),
    )
    if cfg.qk_ln and not _same_eps(cfg.norm_eps, FOUNDRY_NORM_EPS):
        attn_config["norm_eps"] = cfg.norm_eps  # else q_ln and k_ln keep 1e-5 (see FOUNDRY_NORM_EPS)
    ffn_config: dict[str, Any] = {"ffn_type": "mptmlp"}
    if not float(cfg.d_model * cfg.expansion_ratio).is_integer():
        # llm-foundry rejects a fractional d_model * expansion_ratio; the explicit size is what we built.
        ffn_config["ffn_hidden_size"] = cfg.ffn_hidden_size
    values: dict[str, Any] = {
        "architectures": [REMOTE_ARCHITECTURE],
        "auto_map": dict(REMOTE_AUTO_MAP),
        "model_type": MODEL_TYPE,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_layers": cfg.n_layers,
        "expansion_ratio": _int_if_integral(cfg.expansion_ratio),
        "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "no_bias": cfg.no_bias,
        "learned_pos_emb": cfg.learned_pos_emb,
        "logit_scale": cfg.logit_scale,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "emb_pdrop": cfg.emb_pdrop,
        "resid_pdrop": cfg.resid_pdrop,
        "embedding_fraction": cfg.embedding_fraction,
        "norm_type": "low_precision_layernorm",
        "norm_eps": cfg.norm_eps,
        "fc_type": {"name": "torch"},
        "init_device": "cpu",
        "use_cache": False,
        "attn_config": attn_config,
        "ffn_config": ffn_config,
        "init_config": _init_config(cfg),
        "torch_dtype": dtype,
    }
    if eos_token_id is not None:
        values["eos_token_id"] = eos_token_id
    return values


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: MPTConfig) -> dict[str, torch.Tensor]:
    """Our parameters under the names both Hugging Face layouts use (they are ours already).

    A tied lm_head is not stored: transformers and llm-foundry both tie it to `transformer.wte`.
    """
    check_state_dict(state, cfg, "the model's state dict")
    # Our tied model has no lm_head parameter at all, so the names carry over one to one.
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


# ---- Hugging Face -> ours ---------------------------------------------------------------------


def detect_layout(values: dict[str, Any]) -> str:
    """TRANSFORMERS or LLM_FOUNDRY, from the architectures / auto_map / nested configs of config.json."""
    architectures = values.get("architectures") or []
    if "auto_map" in values or REMOTE_ARCHITECTURE in architectures:
        return LLM_FOUNDRY
    if NATIVE_ARCHITECTURE in architectures:
        return TRANSFORMERS
    return LLM_FOUNDRY if "init_config" in values or "ffn_config" in values else TRANSFORMERS


def config_from_hf(values: dict[str, Any], where: str = "config.json") -> HFModelInfo:
    """Translate a Hugging Face MPT config.json (either layout) into an MPTConfig.

    Keys a layout leaves out take that layout's defaults (llm-foundry's no_bias default is False,
    transformers' is True). Every feature mptlike cannot run is listed in one MptlikeError.
    """
    layout = detect_layout(values)
    foundry = layout == LLM_FOUNDRY
    attn = _section(values, "attn_config", where)
    ffn = _section(values, "ffn_config", where)
    init = _section(values, "init_config", where)
    gaps = _unsupported(values, attn, ffn, foundry=foundry)
    if gaps:
        raise MptlikeError(
            f"{where} uses MPT features mptlike does not implement: {'; '.join(gaps)}; "
            "only plain MPT models (ALiBi or learned positions, GELU MLP, LayerNorm) can be converted"
        )
    for key in ("d_model", "n_heads", "n_layers", "vocab_size"):
        if key not in values:
            raise MptlikeError(f"{where} has no {key!r}: it is not a complete MPT config.json")

    try:
        config = MPTConfig(**_config_kwargs(values, attn, ffn, init, where, foundry=foundry))
    except (MptlikeError, TypeError, ValueError) as exc:
        if str(exc).startswith(where):  # already names the file
            raise
        raise MptlikeError(f"{where} does not describe a valid MPT model: {exc}") from None
    eos = values.get("eos_token_id")
    return HFModelInfo(
        config=config,
        layout=layout,
        fused_qkv=bool(attn.get("fused_qkv", True)),
        eos_token_id=eos if isinstance(eos, int) and not isinstance(eos, bool) else None,
    )


def _config_kwargs(
    values: dict[str, Any],
    attn: dict[str, Any],
    ffn: dict[str, Any],
    init: dict[str, Any],
    where: str,
    *,
    foundry: bool,
) -> dict[str, Any]:
    """MPTConfig keyword arguments from the flat keys and the nested attn/ffn/init sections."""
    attn_type = attn.get("attn_type") or "multihead_attention"
    if attn_type == "multiquery_attention":
        kv_n_heads = 1
    elif attn_type == "grouped_query_attention":
        # llm-foundry's attn_config default; multi-head exports carry a stale kv_n_heads it ignores.
        kv_n_heads = attn.get("kv_n_heads", 1)
    else:
        kv_n_heads = values["n_heads"]
    alibi = bool(attn.get("alibi", not foundry))
    return dict(
        d_model=values["d_model"],
        n_heads=values["n_heads"],
        n_layers=values["n_layers"],
        expansion_ratio=_expansion_ratio(values, ffn, where),
        max_seq_len=values.get("max_seq_len", 2048),
        vocab_size=values["vocab_size"],
        norm_eps=_norm_eps(values, foundry=foundry),
        no_bias=_no_bias(values, foundry=foundry),
        tie_word_embeddings=bool(values.get("tie_word_embeddings", True)),
        logit_scale=values.get("logit_scale"),
        # llm-foundry switches learned positions off whenever ALiBi is on; transformers never has them.
        learned_pos_emb=bool(values.get("learned_pos_emb", True)) and not alibi,
        emb_pdrop=float(values.get("emb_pdrop") or 0.0),
        resid_pdrop=float(values.get("resid_pdrop") or 0.0),
        attn_pdrop=float(attn.get("attn_pdrop") or 0.0),
        embedding_fraction=float(values.get("embedding_fraction", 1.0)),
        alibi=alibi,
        alibi_bias_max=attn.get("alibi_bias_max", TRANSFORMERS_ALIBI_BIAS_MAX),
        kv_n_heads=kv_n_heads,
        qk_ln=bool(attn.get("qk_ln", False)),
        clip_qkv=attn.get("clip_qkv") or None,
        softmax_scale=attn.get("softmax_scale"),
        attn_uses_sequence_id=bool(attn.get("attn_uses_sequence_id", False)),
        **_init_kwargs(init, where),
    )


def _section(values: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    section = values.get(key)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise MptlikeError(f"{where} has {key}={section!r}: it must be a JSON object")
    return section


def _no_bias(values: dict[str, Any], *, foundry: bool) -> bool:
    return bool(values.get("no_bias", not foundry))


def _norm_eps(values: dict[str, Any], *, foundry: bool) -> Any:
    """llm-foundry calls it norm_eps, transformers layer_norm_epsilon; each layout's own key comes first."""
    keys = ("norm_eps", "layer_norm_epsilon") if foundry else ("layer_norm_epsilon", "norm_eps")
    return next((values[key] for key in keys if values.get(key) is not None), FOUNDRY_NORM_EPS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unsupported(values: dict[str, Any], attn: dict[str, Any], ffn: dict[str, Any], *, foundry: bool) -> list[str]:
    """Every setting of config.json that makes a network mptlike does not build (the defaults make ours).

    Keys and defaults are llm-foundry 0.22's (configuration_mpt.py, config_defaults.py); keys only
    older releases wrote (prefix_lm) are refused when they switch something on.
    """
    gaps = _attention_gaps(values, attn, foundry=foundry)
    head_dim, d_model, n_heads = values.get("head_dim"), values.get("d_model"), values.get("n_heads")
    if head_dim is not None:
        derived = d_model // n_heads if _is_number(d_model) and _is_number(n_heads) and n_heads > 0 else None
        if head_dim != derived:
            gaps.append(f"head_dim={head_dim!r} (mptlike's head_dim is d_model / n_heads = {derived})")
    attention_bias = values.get("attention_bias")
    no_bias = _no_bias(values, foundry=foundry)
    if attention_bias is not None and bool(attention_bias) == no_bias:
        if no_bias:
            gaps.append("attention_bias=true with no_bias=true (a bias on the q/k/v projection only)")
        else:
            gaps.append("attention_bias=false with no_bias=false (biases everywhere but the q/k/v projection)")
    norm_type = values.get("norm_type")
    if norm_type is not None and str(norm_type).lower() not in _NORM_TYPES:
        gaps.append(f"norm_type={norm_type!r}")
    gaps += _fc_type_gaps("fc_type", values.get("fc_type"))
    gaps += _fc_type_gaps("ffn_config.fc_type", ffn.get("fc_type"))
    ffn_type = ffn.get("ffn_type")
    if ffn_type not in (None, "mptmlp"):
        gaps.append(f"ffn_config.ffn_type={ffn_type!r}")
    act = ffn.get("ffn_act_fn")
    exact_gelu = isinstance(act, dict) and set(act) <= {"name", "approximate"} and act.get("name") == "gelu"
    if act is not None and not (exact_gelu and act.get("approximate", "none") == "none"):
        gaps.append(f"ffn_config.ffn_act_fn={act!r}")
    for key in ("residual_modification", "final_logit_softcapping"):
        if values.get(key) is not None:
            gaps.append(f"{key}={values[key]!r}")
    if values.get("block_overrides"):
        gaps.append("block_overrides (per-layer attention settings)")
    return gaps


def _attention_gaps(values: dict[str, Any], attn: dict[str, Any], *, foundry: bool) -> list[str]:
    gaps = []
    attn_type = attn.get("attn_type")
    if attn_type is not None and attn_type not in _ATTN_TYPES:
        gaps.append(f"attn_config.attn_type={attn_type!r}")
    for key in ("prefix_lm", "rope", "nope", "qk_gn"):
        if attn.get(key):
            gaps.append(f"attn_config.{key}=true")
    if attn.get("sliding_window_size") not in (None, -1):
        gaps.append(f"attn_config.sliding_window_size={attn['sliding_window_size']!r}")
    if attn.get("attn_logit_softcapping") is not None:
        gaps.append(f"attn_config.attn_logit_softcapping={attn['attn_logit_softcapping']!r}")
    tuning = attn.get("attn_temperature_tuning")
    if tuning is not None and not (isinstance(tuning, dict) and not tuning.get("attn_scale")):
        gaps.append(f"attn_config.attn_temperature_tuning={tuning!r}")
    if attn.get("kv_dim") not in (None, values.get("d_model")):
        gaps.append(f"attn_config.kv_dim={attn['kv_dim']!r} (cross-attention inputs)")
    for key in ("reuse_kv_layer_idx", "reuse_kv_x_layer_idx"):
        if attn.get(key) is not None:
            gaps.append(f"attn_config.{key}={attn[key]!r}")
    if foundry and attn.get("qk_ln"):
        # llm-foundry's blocks do not hand norm_type / norm_eps to the attention class: q_ln and k_ln
        # take attn_config's (default low-precision LayerNorm, 1e-5). Ours use the model's norm.
        qk_norm = attn.get("norm_type", "low_precision_layernorm")
        if str(qk_norm).lower() not in _NORM_TYPES:
            gaps.append(f"attn_config.norm_type={qk_norm!r} (the qk_ln norms)")
        qk_eps, eps = attn.get("norm_eps", FOUNDRY_NORM_EPS), _norm_eps(values, foundry=True)
        if _is_number(qk_eps) and _is_number(eps) and not _same_eps(qk_eps, eps):
            gaps.append(
                f"qk_ln with norm_eps={eps} but attn_config.norm_eps={qk_eps} (llm-foundry's q/k norms take the "
                "latter; mptlike uses one eps for every norm)"
            )
    return gaps


def _fc_type_gaps(key: str, fc_type: Any) -> list[str]:
    """llm-foundry 0.22 writes {"name": "torch"}; older releases the bare string."""
    if fc_type is None or fc_type == "torch":
        return []
    if isinstance(fc_type, dict) and fc_type.get("name", "torch") == "torch" and set(fc_type) <= _FC_TYPE_OVERRIDDEN:
        return []
    return [f"{key}={fc_type!r}"]


def _expansion_ratio(values: dict[str, Any], ffn: dict[str, Any], where: str) -> float:
    ratio = values.get("expansion_ratio", 4)
    hidden = ffn.get("ffn_hidden_size")
    if hidden is None:
        return ratio
    d_model = values.get("d_model")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
        raise MptlikeError(f"{where} has ffn_config.ffn_hidden_size={hidden!r}: it must be a positive integer")
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
        raise MptlikeError(f"{where} has d_model={d_model!r}: it must be a positive integer")
    # mptlike sizes the MLP as int(d_model * expansion_ratio): find the ratio whose product rounds to hidden.
    ratio = hidden / d_model
    for _ in range(4):
        if int(d_model * ratio) >= hidden:
            break
        ratio = math.nextafter(ratio, math.inf)
    if int(d_model * ratio) != hidden:
        raise MptlikeError(
            f"{where} has ffn_hidden_size={hidden}, which d_model={d_model} times a ratio cannot reproduce"
        )
    return _int_if_integral(ratio)


def _init_kwargs(init: dict[str, Any], where: str) -> dict[str, Any]:
    """The init scheme only matters for training from scratch, so an unknown one falls back with a warning."""
    kwargs: dict[str, Any] = {}
    name = init.get("name")
    if name in INIT_NAMES:
        kwargs["init_name"] = name
    elif name is not None:
        log.warning("%s: init_config.name=%r is not one of mptlike's schemes; using the default", where, name)
    nonlinearity = init.get("init_nonlinearity")
    if nonlinearity in INIT_NONLINEARITIES:
        kwargs["init_nonlinearity"] = nonlinearity
    if init.get("init_std") is not None:
        kwargs["init_std"] = float(init["init_std"])
    div = init.get("init_div_is_residual")
    if isinstance(div, str):
        try:
            div = float(div)
        except ValueError:
            raise MptlikeError(
                f"{where} has init_config.init_div_is_residual={div!r}: use true, false or a number"
            ) from None
    if div is not None:
        kwargs["init_div_is_residual"] = div
    if init.get("emb_init_std") is not None:
        kwargs["emb_init_std"] = float(init["emb_init_std"])
    if init.get("emb_init_uniform_lim") is not None:
        kwargs["emb_init_uniform_lim"] = init["emb_init_uniform_lim"]
    return kwargs


def state_dict_from_hf(
    state: dict[str, torch.Tensor], info: HFModelInfo, where: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Hugging Face MPT tensors (either layout) as our state dict; shapes are checked against the config."""
    cfg = info.config
    if state and all(name.startswith("model.") for name in state):
        # Composer-style checkpoints wrap the HF model in a `model` attribute.
        state = {name[len("model."):]: tensor for name, tensor in state.items()}
    state = dict(state)
    if not info.fused_qkv:
        _fuse_qkv(state, cfg, where)
    if cfg.tie_word_embeddings and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        wte = state.get("transformer.wte.weight")
        if wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
            log.warning("%s: lm_head.weight differs from transformer.wte.weight but the config ties them; "
                        "keeping transformer.wte.weight as both", where)
    check_state_dict(state, cfg, where)
    return state


def _fuse_qkv(state: dict[str, torch.Tensor], cfg: MPTConfig, where: str) -> None:
    for i in range(cfg.n_layers):
        prefix = f"transformer.blocks.{i}.attn."
        for kind in ("weight", "bias"):
            parts = [f"{prefix}{w}.{kind}" for w in ("Wq", "Wk", "Wv")]
            present = [p in state for p in parts]
            if not any(present):
                continue
            if not all(present):
                missing = [p for p, ok in zip(parts, present) if not ok]
                raise MptlikeError(f"{where} is missing {missing[0]}: the separate q/k/v projections are incomplete")
            state[f"{prefix}Wqkv.{kind}"] = torch.cat([state.pop(p) for p in parts], dim=0)


def expected_shapes(cfg: MPTConfig) -> dict[str, torch.Size]:
    """Every parameter our model has for `cfg`, with its shape (built on meta: no memory)."""
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def check_state_dict(state: dict[str, torch.Tensor], cfg: MPTConfig, where: str) -> None:
    """Raise one MptlikeError naming missing, unexpected and misshapen tensors."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{name} {tuple(state[name].shape)} (expected {tuple(shape)})"
        for name, shape in expected.items()
        if name in state and state[name].shape != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape ({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})")
    if problems:
        raise MptlikeError(
            f"the tensors of {where} do not match its config: {'; '.join(problems)}; "
            "the weights and config.json must come from the same model"
        )
