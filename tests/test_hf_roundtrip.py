"""Weights through Hugging Face's MPT format and back, checked against transformers' MptForCausalLM."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mptlike.errors import MptlikeError
from mptlike.integrations import hf, hf_io
from mptlike.integrations.checkpoint_io import model_from_state
from mptlike.model import MPTConfig, MPTForCausalLM

transformers = pytest.importorskip("transformers")


def export(model: MPTForCausalLM, out, *, remote_code=False, max_shard_bytes=hf_io.DEFAULT_MAX_SHARD_BYTES):
    out.mkdir()
    config = hf.to_hf_config(model.config, remote_code=remote_code)
    hf_io.write_hf_folder(out, config, hf.to_hf_state_dict(model.state_dict(), model.config),
                          max_shard_bytes=max_shard_bytes)
    return out


def import_folder(folder) -> MPTForCausalLM:
    info = hf.config_from_hf(hf_io.read_hf_config(folder), "config.json")
    state = hf.state_dict_from_hf(hf_io.read_hf_weights(folder), info)
    return model_from_state(info.config, state).eval()


def load_transformers(folder):
    model, info = transformers.MptForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def tiny(**overrides) -> MPTForCausalLM:
    torch.manual_seed(0)
    values = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=131)
    values.update(overrides)
    return MPTForCausalLM(MPTConfig(**values)).eval()


@pytest.mark.parametrize("d_model,n_heads,n_layers", [(64, 4, 2), (96, 6, 3), (120, 12, 2)])
def test_transformers_loads_our_export_with_the_same_logits(tmp_path, d_model, n_heads, n_layers):
    ours = tiny(d_model=d_model, n_heads=n_heads, n_layers=n_layers)
    ref = load_transformers(export(ours, tmp_path / "hf"))
    ids = torch.randint(0, 131, (2, 29))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_untied_head_clip_qkv_and_softmax_scale_survive_the_export(tmp_path):
    ours = tiny(tie_word_embeddings=False, clip_qkv=0.5, softmax_scale=0.3, init_name="baseline_", init_std=0.3)
    ref = load_transformers(export(ours, tmp_path / "hf"))
    assert not ref.config.tie_word_embeddings
    ids = torch.randint(0, 131, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_sharded_export_loads_in_transformers(tmp_path):
    ours = tiny()
    out = export(ours, tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((out / hf_io.SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    ref = load_transformers(out)
    ids = torch.randint(0, 131, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_hf_to_ours_to_hf_keeps_every_tensor_bit_for_bit(tmp_path, dtype, shard_size):
    torch.manual_seed(3)
    cfg = transformers.MptConfig(d_model=48, n_heads=6, n_layers=2, max_seq_len=32, vocab_size=97,
                                 attn_config={"alibi": True, "clip_qkv": 4.0})
    source = transformers.MptForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    source.save_pretrained(tmp_path / "src", **kwargs)

    ours = import_folder(tmp_path / "src")
    ours.save_pretrained(tmp_path / "ours")
    back = export(MPTForCausalLM.from_pretrained(tmp_path / "ours"), tmp_path / "back")

    original = hf_io.read_hf_weights(tmp_path / "src")
    original.pop("lm_head.weight", None)  # tied: both sides may leave it out
    result = load_file(back / hf_io.SAFETENSORS_NAME)
    assert sorted(result) == sorted(original)
    for name, tensor in original.items():
        assert result[name].dtype == dtype
        assert torch.equal(result[name], tensor), name


def test_every_feature_transformers_lacks_is_named_in_one_error():
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=50, kv_n_heads=2, qk_ln=True,
                    expansion_ratio=2, logit_scale=0.5, no_bias=False, alibi_bias_max=4)
    with pytest.raises(MptlikeError) as err:
        hf.to_hf_config(cfg)
    message = str(err.value)
    for feature in ("kv_n_heads=2", "qk_ln", "expansion_ratio=2", "logit_scale", "no_bias=false", "alibi_bias_max=4"):
        assert feature in message
    assert "--remote-code" in message
    learned = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=50, alibi=False, learned_pos_emb=True)
    with pytest.raises(MptlikeError, match="learned_pos_emb=true; alibi=false"):
        hf.to_hf_config(learned)


def test_remote_code_export_keeps_gqa_qk_ln_biases_and_learned_positions(tmp_path):
    ours = tiny(kv_n_heads=2, qk_ln=True, no_bias=False, expansion_ratio=2.5, logit_scale="inv_sqrt_d_model",
                alibi=False, learned_pos_emb=True, tie_word_embeddings=False, clip_qkv=6.0, init_name="baseline_",
                norm_eps=1e-6)
    out = export(ours, tmp_path / "remote", remote_code=True)
    values = json.loads((out / "config.json").read_text())
    assert values["model_type"] == "mpt" and values["architectures"] == ["MPTForCausalLM"]
    assert values["attn_config"]["attn_type"] == "grouped_query_attention"
    assert values["attn_config"]["kv_n_heads"] == 2 and values["init_config"]["name"] == "baseline_"
    # llm-foundry's q/k norms read their eps from attn_config, the other norms from norm_eps.
    assert values["norm_eps"] == values["attn_config"]["norm_eps"] == 1e-6
    back = import_folder(out)
    assert back.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("kv_n_heads,attn_type", [(4, "multihead_attention"), (1, "multiquery_attention")])
def test_remote_code_attn_config_has_only_arguments_of_llm_foundry_0_22(kv_n_heads, attn_type):
    """Its multi-head and multi-query classes take no kv_n_heads, and no class a prefix_lm (a TypeError on load)."""
    values = hf.to_hf_config(MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=50, kv_n_heads=kv_n_heads),
                             remote_code=True)
    attn = values["attn_config"]
    assert attn["attn_type"] == attn_type and attn["attn_impl"] == "torch"
    assert "kv_n_heads" not in attn and "prefix_lm" not in attn and "norm_eps" not in attn
    assert values["norm_eps"] == 1e-5 and values["fc_type"] == {"name": "torch"}


def test_remote_code_refuses_learned_positions_next_to_alibi():
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=50, alibi=True, learned_pos_emb=True)
    with pytest.raises(MptlikeError, match="llm-foundry's MPT cannot express: learned_pos_emb=true with alibi=true"):
        hf.to_hf_config(cfg, remote_code=True)


def test_unsupported_hf_features_are_listed_together():
    values = {"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 1, "vocab_size": 50,
              "attn_config": {"rope": True, "attn_type": "multihead_attention"},
              "ffn_config": {"ffn_type": "mptglu"}, "norm_type": "rmsnorm"}
    with pytest.raises(MptlikeError) as err:
        hf.config_from_hf(values, "x/config.json")
    for feature in ("rope", "mptglu", "rmsnorm"):
        assert feature in str(err.value)


def test_wrong_tensor_shape_names_the_tensor():
    ours = tiny()
    info = hf.config_from_hf(hf.to_hf_config(ours.config))
    state = dict(ours.state_dict())
    state["transformer.blocks.1.ffn.up_proj.weight"] = torch.zeros(3, 64)
    with pytest.raises(MptlikeError, match=r"blocks\.1\.ffn\.up_proj\.weight \(3, 64\)"):
        hf.state_dict_from_hf(state, info)
