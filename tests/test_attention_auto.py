"""model.attn_impl=auto: the fastest correct backend present on the device, chosen by one pure function."""

import importlib

import pytest
import torch

from mptlike.errors import MptlikeError
from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.model.presets import PRESETS
from mptlike.ops.attention import check_attn_impl, resolve_attn_impl

attention_module = importlib.import_module("mptlike.ops.attention")


def _present(monkeypatch, *impls):
    monkeypatch.setattr(attention_module, "_runs_on_cuda", lambda impl: impl in impls)


def test_auto_is_sdpa_on_cpu():
    assert resolve_attn_impl("auto", "cpu") == "sdpa"


def test_auto_on_cuda_prefers_triton_then_flex_then_sdpa(monkeypatch):
    _present(monkeypatch, "triton", "flex")
    assert resolve_attn_impl("auto", "cuda") == "triton"
    _present(monkeypatch, "flex")
    assert resolve_attn_impl("auto", "cuda") == "flex"
    _present(monkeypatch)
    assert resolve_attn_impl("auto", "cuda") == "sdpa"


def test_auto_with_attention_dropout_is_sdpa_because_triton_and_flex_have_none(monkeypatch):
    _present(monkeypatch, "triton", "flex")
    assert resolve_attn_impl("auto", "cuda", attn_pdrop=0.1) == "sdpa"


def test_auto_passes_over_triton_for_heads_wider_than_its_kernel(monkeypatch):
    _present(monkeypatch, "triton", "flex")
    assert resolve_attn_impl("auto", "cuda", head_dim=128) == "triton"
    assert resolve_attn_impl("auto", "cuda", head_dim=320) == "flex"


@pytest.mark.parametrize("impl", ["torch", "sdpa", "flex", "flash", "triton"])
def test_a_named_backend_is_kept_on_any_device(impl):
    assert resolve_attn_impl(impl, "cpu") == impl
    assert resolve_attn_impl(impl, "cuda", attn_pdrop=0.1) == impl


def test_unknown_names_are_refused():
    with pytest.raises(MptlikeError, match="auto, torch, sdpa"):
        resolve_attn_impl("fast", "cpu")


def test_auto_is_the_default_of_the_config_and_of_every_preset():
    assert MPTConfig().attn_impl == "auto"
    assert all(MPTConfig.from_preset(name).attn_impl == "auto" for name in PRESETS)
    check_attn_impl("auto")  # always runnable: it only ever picks a backend that is present


def test_a_model_with_auto_computes_what_sdpa_computes_on_cpu():
    cfg = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=64)
    auto = MPTForCausalLM(MPTConfig(**cfg))
    sdpa = MPTForCausalLM(MPTConfig(**cfg, attn_impl="sdpa"))
    sdpa.load_state_dict(auto.state_dict())
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(auto(ids).logits, sdpa(ids).logits, rtol=0, atol=0)
