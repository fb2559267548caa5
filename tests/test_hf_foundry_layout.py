"""llm-foundry's trust_remote_code export (the layout of mosaicml/mpt-7b on the Hub) converts to ours.

The checkpoint is built here from a tiny random transformers MptForCausalLM: the published parameter
names, a config.json shaped like mpt-7b's (attn_config, init_config, auto_map), and the weights split
into pytorch_model-0000N-of-00002.bin files with an index. transformers' model is the reference.
"""

import json

import pytest
import torch

from mptlike.cli.convert import main as convert
from mptlike.model import MPTForCausalLM

transformers = pytest.importorskip("transformers")

D_MODEL, N_HEADS, N_LAYERS, VOCAB, MAX_SEQ = 64, 4, 2, 131, 64


def mpt7b_style_config(**attn_overrides) -> dict:
    attn = {
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_impl": "torch",
        "attn_pdrop": 0,
        "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False,
        "clip_qkv": None,
        "prefix_lm": False,
        "qk_ln": False,
        "softmax_scale": None,
    }
    attn.update(attn_overrides)
    return {
        "architectures": ["MPTForCausalLM"],
        "attn_config": attn,
        "auto_map": {
            "AutoConfig": "configuration_mpt.MPTConfig",
            "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
        },
        "d_model": D_MODEL,
        "emb_pdrop": 0,
        "embedding_fraction": 1.0,
        "expansion_ratio": 4,
        "init_config": {
            "emb_init_std": None,
            "emb_init_uniform_lim": None,
            "fan_mode": "fan_in",
            "init_div_is_residual": True,
            "init_gain": 0,
            "init_nonlinearity": "relu",
            "init_std": 0.02,
            "name": "kaiming_normal_",
            "verbose": 0,
        },
        "init_device": "cpu",
        # mpt-7b ships learned_pos_emb true next to alibi true; llm-foundry then builds no wpe.
        "learned_pos_emb": True,
        "logit_scale": None,
        "max_seq_len": MAX_SEQ,
        "model_type": "mpt",
        "n_heads": N_HEADS,
        "n_layers": N_LAYERS,
        "no_bias": True,
        "norm_type": "low_precision_layernorm",
        "resid_pdrop": 0,
        "tokenizer_name": "EleutherAI/gpt-neox-20b",
        "torch_dtype": "float32",
        "transformers_version": "4.28.1",
        "use_cache": False,
        "verbose": 0,
        "vocab_size": VOCAB,
    }


def reference_model(clip_qkv=None):
    torch.manual_seed(7)
    cfg = transformers.MptConfig(d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_LAYERS, vocab_size=VOCAB,
                                 max_seq_len=MAX_SEQ, attn_config={"alibi": True, "clip_qkv": clip_qkv})
    return transformers.MptForCausalLM(cfg).eval()


def write_sharded_bin(folder, state: dict, config: dict) -> None:
    """Two pickled shards and the index that names them, as `save_pretrained` of transformers 4.28 wrote."""
    folder.mkdir()
    names = sorted(state)
    first = {n for n in names if n.startswith(("transformer.wte", "transformer.blocks.0."))}
    shards = {"pytorch_model-00001-of-00002.bin": {n: state[n] for n in names if n in first},
              "pytorch_model-00002-of-00002.bin": {n: state[n] for n in names if n not in first}}
    weight_map = {}
    for file, part in shards.items():
        torch.save({k: v.clone() for k, v in part.items()}, folder / file)
        weight_map.update({name: file for name in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def published_state(ref) -> dict:
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert "transformer.blocks.0.attn.Wqkv.weight" in state and "transformer.norm_f.weight" in state
    return state


def ours_after_conversion(tmp_path, src) -> MPTForCausalLM:
    assert convert(["from-hf", str(src), str(tmp_path / "ours")]) == 0
    return MPTForCausalLM.from_pretrained(tmp_path / "ours").eval()


def test_foundry_export_with_sharded_bin_gives_transformers_logits(tmp_path):
    ref = reference_model()
    write_sharded_bin(tmp_path / "mpt", published_state(ref), mpt7b_style_config())
    ours = ours_after_conversion(tmp_path, tmp_path / "mpt")
    assert not ours.config.learned_pos_emb and ours.config.alibi
    ids = torch.randint(0, VOCAB, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_foundry_export_with_separate_q_k_v_and_clip_qkv_gives_transformers_logits(tmp_path):
    ref = reference_model(clip_qkv=0.2)
    state = published_state(ref)
    for i in range(N_LAYERS):
        wq, wk, wv = state.pop(f"transformer.blocks.{i}.attn.Wqkv.weight").split(D_MODEL, dim=0)
        state.update({f"transformer.blocks.{i}.attn.Wq.weight": wq, f"transformer.blocks.{i}.attn.Wk.weight": wk,
                      f"transformer.blocks.{i}.attn.Wv.weight": wv})
    write_sharded_bin(tmp_path / "mpt", state, mpt7b_style_config(fused_qkv=False, clip_qkv=0.2))
    ours = ours_after_conversion(tmp_path, tmp_path / "mpt")
    assert ours.config.clip_qkv == 0.2
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_foundry_grouped_query_config_maps_kv_heads_and_ignores_stale_kv_n_heads():
    from mptlike.integrations.hf import config_from_hf

    gqa = config_from_hf(mpt7b_style_config(attn_type="grouped_query_attention", kv_n_heads=2, qk_ln=True))
    assert gqa.config.kv_n_heads == 2 and gqa.config.qk_ln and gqa.layout == "llm-foundry"
    mqa = config_from_hf(mpt7b_style_config(attn_type="multiquery_attention"))
    assert mqa.config.kv_n_heads == 1
    # llm-foundry releases of 2023-24 wrote kv_n_heads: 1 into every attn_config (their default);
    # multi-head attention ignores it.
    mha = config_from_hf(mpt7b_style_config(kv_n_heads=1))
    assert mha.config.kv_n_heads == N_HEADS


def test_foundry_defaults_apply_when_keys_are_absent():
    from mptlike.integrations.hf import config_from_hf

    values = mpt7b_style_config()
    del values["no_bias"]
    values["attn_config"].pop("alibi")
    info = config_from_hf(values)
    # llm-foundry's own defaults: biases on, ALiBi off (so learned positions on).
    assert not info.config.no_bias and not info.config.alibi and info.config.learned_pos_emb


@pytest.mark.parametrize(
    "change,feature",
    [
        ({"head_dim": 32}, "head_dim=32 (mptlike's head_dim is d_model / n_heads = 16)"),
        ({"attention_bias": True}, "attention_bias=true with no_bias=true"),
        ({"fc_type": {"name": "te"}}, "fc_type={'name': 'te'}"),
    ],
)
def test_llm_foundry_0_22_keys_we_do_not_build_are_refused_as_features(tmp_path, capsys, change, feature):
    """Not a weights/config mismatch: the one line names the feature (tests/foundry builds them for real)."""
    write_sharded_bin(tmp_path / "mpt", published_state(reference_model()), {**mpt7b_style_config(), **change})
    capsys.readouterr()
    assert convert(["from-hf", str(tmp_path / "mpt"), str(tmp_path / "ours")]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "does not implement" in line and feature in line and "same model" not in line
    assert not (tmp_path / "ours").exists()


def test_llm_foundry_0_22_defaults_written_out_are_accepted():
    from mptlike.integrations.hf import config_from_hf

    values = mpt7b_style_config(
        fused_qkv=True, kv_dim=None, nope=False, qk_gn=False, rope=False, rope_impl="dail", rope_theta=10000,
        sliding_window_size=-1, attn_logit_softcapping=None, attn_temperature_tuning={"attn_scale": 0.0,
                                                                                      "floor_scale": 8192})
    del values["attn_config"]["prefix_lm"]
    values.update(head_dim=None, attention_bias=False, fc_type={"name": "torch"}, norm_eps=1e-6,
                  ffn_config={"ffn_type": "mptmlp", "fc_type": {"name": "torch"}}, use_pad_tok_in_ffn=True,
                  block_overrides=None, final_logit_softcapping=None)
    info = config_from_hf(values)
    assert info.layout == "llm-foundry" and info.config.norm_eps == 1e-6 and info.config.no_bias


def test_ffn_hidden_size_that_floating_point_division_does_not_give_back():
    from mptlike.integrations.hf import config_from_hf

    assert int(56 * (115 / 56)) == 114  # the naive ratio loses a unit
    values = {**mpt7b_style_config(), "d_model": 56, "ffn_config": {"ffn_type": "mptmlp", "ffn_hidden_size": 115}}
    assert config_from_hf(values).config.ffn_hidden_size == 115
