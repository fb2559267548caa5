"""Text to token shards, memory-mapped samples, and a deterministic resumable loader."""

from mptlike.data.dataset import TokenDataset
from mptlike.data.loader import ResumableLoader, build_loader
from mptlike.data.manifest import Manifest, ShardInfo, check_compatible
from mptlike.data.prep import prepare, prepare_default_corpus
from mptlike.data.sampler import EpochPermutation
from mptlike.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "EpochPermutation",
    "Manifest",
    "ResumableLoader",
    "ShardInfo",
    "TokenDataset",
    "Tokenizer",
    "build_loader",
    "check_compatible",
    "load_tokenizer",
    "prepare",
    "prepare_default_corpus",
]
