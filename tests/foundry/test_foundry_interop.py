"""Hugging Face interop checked against llm-foundry's own MPT, both ways, through mptlike-convert.

- from-hf: a tiny `llmfoundry.models.mpt.MPTForCausalLM` per feature, written by its own
  `save_pretrained`, converts to our format and gives its logits; a feature we do not build is
  refused in one line that names it.
- to-hf --remote-code: our model per feature loads in llm-foundry's `from_pretrained` with no missing
  or unexpected keys and gives our logits.

Runs where llm-foundry is installed (.venv-composer: llm-foundry 0.22.0, transformers 4.51.3) and
skips itself elsewhere.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("llmfoundry")
from llmfoundry.models.mpt import MPTConfig as FoundryConfig  # noqa: E402
from llmfoundry.models.mpt import MPTForCausalLM as FoundryMPT  # noqa: E402

from mptlike.cli.convert import main as convert  # noqa: E402
from mptlike.model import MPTConfig, MPTForCausalLM  # noqa: E402

pytestmark = [pytest.mark.foundry, pytest.mark.filterwarnings("ignore::UserWarning")]

VOCAB, MAX_SEQ = 101, 32
# Float32 logits of the two implementations of one network agree to rounding.
TOL = dict(rtol=1e-5, atol=1e-5)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random noise on every parameter: biases start at zero and norm weights at one, and a
    conversion that drops or swaps them must not go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype), alpha=0.1)
    return model.eval()


def foundry_model(attn: dict | None = None, **config) -> FoundryMPT:
    """llm-foundry's MPT with attn_impl torch (flash needs CUDA); its own defaults for the rest."""
    values = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=MAX_SEQ)
    values.update(config)
    values["attn_config"] = {"attn_impl": "torch", **(attn or {})}
    torch.manual_seed(0)
    return perturbed(FoundryMPT(FoundryConfig(**values)), seed=1)


def our_model(**config) -> MPTForCausalLM:
    values = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=MAX_SEQ)
    values.update(config)
    torch.manual_seed(0)
    return perturbed(MPTForCausalLM(MPTConfig(**values)), seed=2)


def token_ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, MAX_SEQ), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: MPTForCausalLM, ref: FoundryMPT) -> None:
    ids = token_ids()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = ours(ids).logits
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mptlike-convert: error: ") and "Traceback" not in err
    return lines[0]


# ---- llm-foundry -> ours ---------------------------------------------------------------------

ALIBI = {"alibi": True}
# name: (llm-foundry MPTConfig arguments, what our converted config must say)
FROM_FOUNDRY = {
    "mha_alibi": (dict(attn=ALIBI, no_bias=True), dict(alibi=True, kv_n_heads=4, no_bias=True, learned_pos_emb=False)),
    "foundry_defaults": (dict(), dict(alibi=False, learned_pos_emb=True, no_bias=False)),
    "gqa": (dict(attn={**ALIBI, "attn_type": "grouped_query_attention", "kv_n_heads": 2}), dict(kv_n_heads=2)),
    "mqa": (dict(attn={**ALIBI, "attn_type": "multiquery_attention"}), dict(kv_n_heads=1)),
    "separate_qkv_gqa": (
        dict(attn={**ALIBI, "fused_qkv": False, "attn_type": "grouped_query_attention", "kv_n_heads": 2}),
        dict(kv_n_heads=2),
    ),
    "separate_qkv_biases": (dict(attn={**ALIBI, "fused_qkv": False}, no_bias=False), dict(no_bias=False)),
    "biases_explicit_attention_bias": (dict(attn=ALIBI, no_bias=False, attention_bias=True), dict(no_bias=False)),
    "qk_ln_gqa_biases": (
        dict(attn={**ALIBI, "qk_ln": True, "attn_type": "grouped_query_attention", "kv_n_heads": 2}, no_bias=False),
        dict(qk_ln=True, kv_n_heads=2, no_bias=False),
    ),
    "qk_ln_norm_eps_in_attn_config": (
        dict(attn={**ALIBI, "qk_ln": True, "norm_eps": 1e-6}, norm_eps=1e-6, no_bias=True),
        dict(qk_ln=True, norm_eps=1e-6),
    ),
    "clip_qkv": (dict(attn={**ALIBI, "clip_qkv": 0.3}, no_bias=True), dict(clip_qkv=0.3)),
    "learned_positions": (dict(attn={"alibi": False}, learned_pos_emb=True, no_bias=True), dict(learned_pos_emb=True)),
    "ffn_hidden_size": (
        dict(attn=ALIBI, no_bias=True, ffn_config={"ffn_type": "mptmlp", "ffn_hidden_size": 80}),
        dict(ffn_hidden_size=80),
    ),
    # 115 / 56 * 56 rounds below 115 in floating point: the ratio must be nudged up to rebuild 115.
    "ffn_hidden_size_fractional_seven_heads": (
        dict(attn=ALIBI, d_model=56, n_heads=7, ffn_config={"ffn_type": "mptmlp", "ffn_hidden_size": 115}),
        dict(ffn_hidden_size=115, n_heads=7),
    ),
    "untied_head": (dict(attn=ALIBI, no_bias=True, tie_word_embeddings=False), dict(tie_word_embeddings=False)),
    "bf16": (dict(attn={**ALIBI, "qk_ln": True}, no_bias=False), dict(qk_ln=True)),
    "logit_scale": (dict(attn=ALIBI, no_bias=True, logit_scale=0.5), dict(logit_scale=0.5)),
    "logit_scale_inv_sqrt": (dict(attn=ALIBI, logit_scale="inv_sqrt_d_model"), dict(logit_scale="inv_sqrt_d_model")),
    "softmax_scale": (dict(attn={**ALIBI, "softmax_scale": 0.3}, no_bias=True), dict(softmax_scale=0.3)),
    "norm_eps": (dict(attn=ALIBI, no_bias=True, norm_eps=1e-6), dict(norm_eps=1e-6)),
    "alibi_bias_max_six_heads": (
        dict(attn={**ALIBI, "alibi_bias_max": 4}, d_model=48, n_heads=6, no_bias=True),
        dict(alibi_bias_max=4, n_heads=6),
    ),
    "layernorm_dropout_sequence_id": (
        dict(attn={**ALIBI, "attn_pdrop": 0.1, "attn_uses_sequence_id": True}, norm_type="layernorm",
             resid_pdrop=0.1, emb_pdrop=0.1, embedding_fraction=0.5),
        dict(attn_pdrop=0.1, resid_pdrop=0.1, attn_uses_sequence_id=True, embedding_fraction=0.5),
    ),
}


@pytest.mark.parametrize("name", list(FROM_FOUNDRY))
def test_foundry_save_pretrained_converts_to_the_same_logits(tmp_path, name):
    arguments, expected = FROM_FOUNDRY[name]
    ref = foundry_model(**copy.deepcopy(arguments))
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    ref = ref.to(dtype)
    ref.save_pretrained(tmp_path / "foundry")
    written = json.loads((tmp_path / "foundry" / "config.json").read_text())
    assert written["architectures"] == ["MPTForCausalLM"] and written["torch_dtype"] == str(dtype).split(".")[1]

    assert convert(["from-hf", str(tmp_path / "foundry"), str(tmp_path / "ours")]) == 0
    ours = MPTForCausalLM.from_pretrained(tmp_path / "ours").eval()
    for key, value in expected.items():
        assert getattr(ours.config, key) == value, key
    assert {p.dtype for p in ours.parameters()} == {dtype}
    # bf16: both run in float32 from the same bf16 weights.
    assert_same_logits(ours.float(), ref.float())


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values, indent=2))


SLIDING_OVERRIDE = {
    "order": [{"name": "default"}, {"name": "local"}],
    "overrides": {"local": {"attn_config": {"sliding_window_size": 8}}},
}
# name: (llm-foundry MPTConfig arguments, the feature the one error line must name)
REFUSED = {
    "head_dim": (dict(attn=ALIBI, head_dim=16), "head_dim=16 (mptlike's head_dim is d_model / n_heads = 8)"),
    "qkv_bias_only": (dict(attn=ALIBI, no_bias=True, attention_bias=True), "attention_bias=true with no_bias=true"),
    "no_qkv_bias": (dict(attn=ALIBI, no_bias=False, attention_bias=False), "attention_bias=false with no_bias=false"),
    "rope": (dict(attn={"rope": True, "rope_impl": "hf"}, learned_pos_emb=False), "attn_config.rope=true"),
    "rmsnorm": (dict(attn=ALIBI, norm_type="rmsnorm"), "norm_type='rmsnorm'"),
    "mptglu": (dict(attn=ALIBI, ffn_config={"ffn_type": "mptglu"}), "ffn_config.ffn_type='mptglu'"),
    "relu": (dict(attn=ALIBI, ffn_config={"ffn_type": "mptmlp", "ffn_act_fn": {"name": "relu"}}), "ffn_act_fn"),
    "qk_gn": (dict(attn={**ALIBI, "qk_gn": True}), "attn_config.qk_gn=true"),
    "sliding_window": (dict(attn={**ALIBI, "sliding_window_size": 8}), "attn_config.sliding_window_size=8"),
    "attn_softcapping": (dict(attn={**ALIBI, "attn_logit_softcapping": 30.0}), "attn_config.attn_logit_softcapping"),
    "temperature_tuning": (
        dict(attn={**ALIBI, "attn_temperature_tuning": {"floor_scale": 8, "attn_scale": 0.1}}),
        "attn_config.attn_temperature_tuning",
    ),
    "kv_dim": (dict(attn={**ALIBI, "fused_qkv": False, "kv_dim": 16}), "attn_config.kv_dim=16"),
    "block_overrides": (dict(attn=ALIBI, block_overrides=SLIDING_OVERRIDE), "block_overrides"),
    "final_softcapping": (dict(attn=ALIBI, final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    "qk_ln_norm_eps": (
        dict(attn={**ALIBI, "qk_ln": True}, norm_eps=1e-6),
        "qk_ln with norm_eps=1e-06 but attn_config.norm_eps=1e-05",
    ),
}


def assert_refused(capsys, tmp_path, folder, feature: str) -> str:
    capsys.readouterr()
    rc = convert(["from-hf", str(folder), str(tmp_path / "ours")])
    line = one_error_line(capsys)
    assert rc == 2
    assert "uses MPT features mptlike does not implement" in line and feature in line, line
    assert "same model" not in line
    assert not (tmp_path / "ours").exists()
    return line


@pytest.mark.parametrize("name", list(REFUSED))
def test_foundry_features_we_do_not_build_are_refused_in_one_line(tmp_path, capsys, name):
    arguments, feature = REFUSED[name]
    foundry_model(**copy.deepcopy(arguments)).save_pretrained(tmp_path / "foundry")
    assert_refused(capsys, tmp_path, tmp_path / "foundry", feature)


def test_transformer_engine_layers_are_refused(tmp_path, capsys):
    # fc_type te needs transformer-engine to build, so edit what llm-foundry wrote for torch layers.
    foundry_model(attn=ALIBI).save_pretrained(tmp_path / "foundry")
    written = json.loads((tmp_path / "foundry" / "config.json").read_text())
    assert written["fc_type"] == {"name": "torch"} and written["ffn_config"]["fc_type"] == {"name": "torch"}
    te = {"name": "te"}
    edit_config(tmp_path / "foundry", fc_type=te, ffn_config={"ffn_type": "mptmlp", "fc_type": te})
    line = assert_refused(capsys, tmp_path, tmp_path / "foundry", "fc_type={'name': 'te'}")
    assert "ffn_config.fc_type={'name': 'te'}" in line


def test_several_unsupported_features_share_one_line(tmp_path, capsys):
    foundry_model(attn={"rope": True, "rope_impl": "hf"}, learned_pos_emb=False, norm_type="rmsnorm",
                  ffn_config={"ffn_type": "mptglu"}, head_dim=16).save_pretrained(tmp_path / "foundry")
    line = assert_refused(capsys, tmp_path, tmp_path / "foundry", "attn_config.rope=true")
    for feature in ("head_dim=16", "norm_type='rmsnorm'", "ffn_type='mptglu'"):
        assert feature in line


# ---- ours -> llm-foundry ---------------------------------------------------------------------

# name: our MPTConfig fields
TO_FOUNDRY = {
    "mha_alibi": dict(),
    "gqa": dict(kv_n_heads=2),
    "mqa": dict(kv_n_heads=1),
    "biases": dict(no_bias=False),
    "qk_ln_gqa_biases": dict(qk_ln=True, kv_n_heads=2, no_bias=False),
    "qk_ln_norm_eps": dict(qk_ln=True, norm_eps=1e-6),
    "clip_qkv": dict(clip_qkv=0.3),
    "learned_positions": dict(alibi=False, learned_pos_emb=True),
    "expansion_ratio": dict(expansion_ratio=2.5),
    "expansion_ratio_fractional": dict(d_model=48, n_heads=6, expansion_ratio=100 / 48),
    "untied_head": dict(tie_word_embeddings=False),
    "bf16": dict(qk_ln=True, no_bias=False),
    "logit_scale": dict(logit_scale=0.5),
    "logit_scale_inv_sqrt": dict(logit_scale="inv_sqrt_d_model"),
    "softmax_scale": dict(softmax_scale=0.3),
    "norm_eps": dict(norm_eps=1e-6),
    "alibi_bias_max_six_heads": dict(d_model=48, n_heads=6, alibi_bias_max=4),
    "dropout_sequence_id_init": dict(attn_pdrop=0.1, resid_pdrop=0.1, emb_pdrop=0.1, embedding_fraction=0.5,
                                     attn_uses_sequence_id=True, init_name="baseline_", init_std=0.05),
}


def load_in_foundry(folder) -> FoundryMPT:
    ref, info = FoundryMPT.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return ref.eval()


@pytest.mark.parametrize("name", list(TO_FOUNDRY))
def test_remote_code_export_loads_in_foundry_with_our_logits(tmp_path, name):
    ours = our_model(**TO_FOUNDRY[name])
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    ours = ours.to(dtype)
    ours.save_pretrained(tmp_path / "ours")
    assert convert(["to-hf", "--remote-code", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["torch_dtype"] == str(dtype).split(".")[1]

    ref = load_in_foundry(tmp_path / "hf")
    cfg = ours.config
    attn = ref.transformer.blocks[0].attn
    assert (attn.n_heads, attn.kv_n_heads, attn.head_dim) == (cfg.n_heads, cfg.kv_n_heads, cfg.head_dim)
    assert ref.transformer.norm_f.eps == cfg.norm_eps
    if cfg.qk_ln:
        assert attn.q_ln.eps == attn.k_ln.eps == cfg.norm_eps
    assert hasattr(ref.transformer, "wpe") == cfg.learned_pos_emb and ref.transformer.alibi == cfg.alibi
    assert (ref.lm_head is None) == cfg.tie_word_embeddings
    assert {p.dtype for p in ref.parameters()} == {torch.float32}  # from_pretrained's default
    assert_same_logits(ours.float(), ref)


def test_written_attn_config_holds_only_what_each_attention_class_takes(tmp_path):
    """llm-foundry hands every attn_config key but the position ones to the attention class."""
    import inspect

    from llmfoundry.models.layers.attention import GroupedQueryAttention, MultiheadAttention, MultiQueryAttention
    from llmfoundry.models.layers.blocks import MPTBlock

    excluded = MPTBlock.args_to_exclude_in_attn_class.fget(None)
    classes = {"multihead_attention": MultiheadAttention, "multiquery_attention": MultiQueryAttention,
               "grouped_query_attention": GroupedQueryAttention}
    for i, kv_n_heads in enumerate((4, 1, 2)):
        our_model(kv_n_heads=kv_n_heads, qk_ln=True, norm_eps=1e-6).save_pretrained(tmp_path / f"ours{i}")
        assert convert(["to-hf", "--remote-code", str(tmp_path / f"ours{i}"), str(tmp_path / f"hf{i}")]) == 0
        attn_config = json.loads((tmp_path / f"hf{i}" / "config.json").read_text())["attn_config"]
        accepted = set(inspect.signature(classes[attn_config["attn_type"]]).parameters)
        assert set(attn_config) - excluded <= accepted, attn_config
        assert "prefix_lm" not in attn_config


def test_foundry_drops_learned_positions_under_alibi_so_that_export_is_refused(tmp_path, capsys):
    ref = foundry_model(attn=ALIBI, learned_pos_emb=True)
    assert not ref.config.learned_pos_emb and not hasattr(ref.transformer, "wpe")
    our_model(alibi=True, learned_pos_emb=True).save_pretrained(tmp_path / "ours")
    capsys.readouterr()
    assert convert(["to-hf", "--remote-code", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 2
    assert "learned_pos_emb=true with alibi=true" in one_error_line(capsys)
    assert not (tmp_path / "hf").exists()


def test_foundry_to_ours_to_foundry_keeps_every_tensor(tmp_path):
    ref = foundry_model(attn={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True,
                              "clip_qkv": 0.5, "alibi": False}, learned_pos_emb=True, tie_word_embeddings=False)
    ref.save_pretrained(tmp_path / "foundry", max_shard_size="20KB")
    assert (tmp_path / "foundry" / "model.safetensors.index.json").is_file()
    assert convert(["from-hf", str(tmp_path / "foundry"), str(tmp_path / "ours")]) == 0
    assert convert(["to-hf", "--remote-code", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = load_in_foundry(tmp_path / "back")
    original = ref.state_dict()
    assert sorted(back.state_dict()) == sorted(original)
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert_same_logits(MPTForCausalLM.from_pretrained(tmp_path / "ours").eval(), back)
