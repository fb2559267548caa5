"""Named model sizes: the single source of truth for `MPTConfig.from_preset` and `conf/model/*.yaml`.

`conf/model/*.yaml` are generated from this table (`python -m mptlike.model.conf_files --write-conf
conf/model`) and a test fails when they drift. Sizes follow llm-foundry's MPT training configs;
mpt-7b and mpt-30b are the published models (vocab 50432, the GPT-NeoX-20B tokenizer padded to a
multiple of 64).
"""

from __future__ import annotations

from typing import Any

_NEOX_VOCAB = 50368  # llm-foundry's training yamls: GPT-NeoX-20B vocab padded for tensor cores
_PUBLISHED_VOCAB = 50432  # what the released MPT-7B / MPT-30B checkpoints carry

PRESETS: dict[str, dict[str, Any]] = {
    # A few million parameters: unit tests and the CPU quickstart (vocab of the stdlib BPE).
    "mpt-tiny": dict(d_model=256, n_heads=8, n_layers=4, max_seq_len=256, vocab_size=8192),
    "mpt-125m": dict(d_model=768, n_heads=12, n_layers=12, max_seq_len=2048, vocab_size=_NEOX_VOCAB),
    "mpt-350m": dict(d_model=1024, n_heads=16, n_layers=24, max_seq_len=2048, vocab_size=_NEOX_VOCAB),
    "mpt-760m": dict(d_model=1536, n_heads=12, n_layers=24, max_seq_len=2048, vocab_size=_NEOX_VOCAB),
    "mpt-1b": dict(d_model=2048, n_heads=16, n_layers=24, max_seq_len=2048, vocab_size=_NEOX_VOCAB),
    "mpt-3b": dict(d_model=2560, n_heads=20, n_layers=32, max_seq_len=2048, vocab_size=_NEOX_VOCAB),
    "mpt-7b": dict(d_model=4096, n_heads=32, n_layers=32, max_seq_len=2048, vocab_size=_PUBLISHED_VOCAB),
    "mpt-13b": dict(d_model=5120, n_heads=40, n_layers=40, max_seq_len=2048, vocab_size=_NEOX_VOCAB),
    "mpt-30b": dict(d_model=7168, n_heads=64, n_layers=48, max_seq_len=8192, vocab_size=_PUBLISHED_VOCAB),
    "mpt-70b": dict(d_model=8192, n_heads=64, n_layers=80, max_seq_len=2048, vocab_size=_NEOX_VOCAB),
}


if __name__ == "__main__":
    raise SystemExit("mptlike.model.presets: the conf/model writer moved: python -m mptlike.model.conf_files "
                     "--write-conf conf/model")
