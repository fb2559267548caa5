"""mptlike: pretrain MPT-style language models."""

__version__ = "0.1.0"
