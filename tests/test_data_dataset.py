import numpy as np
import pytest
import torch

from mptlike.data import TokenDataset
from mptlike.data.shards import write_token_folder

EOS = 0


def _docs(rng, n_docs, vocab):
    """Random documents (ids 1..vocab-1), each followed by EOS, as separate arrays."""
    docs = []
    for _ in range(n_docs):
        body = rng.integers(1, vocab, size=int(rng.integers(1, 40)))
        docs.append(np.append(body, EOS))
    return docs


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 30, 300)
    # Tiny shards so that many windows straddle shard boundaries.
    write_token_folder(
        tmp_path, {"train": docs}, tokenizer="test", vocab_size=300, eos_id=EOS, shard_tokens=37
    )
    return tmp_path, np.concatenate(docs)


def test_samples_are_overlapping_windows_of_the_concatenated_stream(folder):
    path, stream = folder
    seq = 16
    ds = TokenDataset(path, "train", seq_len=seq)
    assert len(ds) == (len(stream) - 1) // seq
    for i in range(len(ds)):
        window = stream[i * seq : i * seq + seq + 1]
        item = ds[i]
        assert item["input_ids"].dtype == torch.int64
        assert item["input_ids"].tolist() == window[:-1].tolist()
        assert item["labels"].tolist() == window[1:].tolist()


def test_shards_use_uint16_for_small_vocab_and_uint32_above_65536(tmp_path):
    a = np.array([1, 2, 70000, 0])
    write_token_folder(tmp_path / "big", {"train": [a]}, tokenizer="t", vocab_size=70001, eos_id=0)
    write_token_folder(tmp_path / "small", {"train": [a % 300]}, tokenizer="t", vocab_size=300, eos_id=0)
    big = TokenDataset(tmp_path / "big", seq_len=2)
    small = TokenDataset(tmp_path / "small", seq_len=2)
    assert big.manifest.dtype == "uint32" and (tmp_path / "big/train_00000.bin").stat().st_size == 16
    assert small.manifest.dtype == "uint16" and (tmp_path / "small/train_00000.bin").stat().st_size == 8
    assert big[0]["input_ids"].tolist() == [1, 2]
    assert big[0]["labels"].tolist() == [2, 70000]


def test_sequence_id_starts_a_new_document_after_each_eos(tmp_path):
    stream = np.array([5, 6, EOS, 7, EOS, EOS, 8, 9, 3])
    write_token_folder(tmp_path, {"train": [stream]}, tokenizer="t", vocab_size=10, eos_id=EOS)
    ds = TokenDataset(tmp_path, seq_len=8, with_sequence_id=True)
    item = ds[0]
    # Reference: walk the inputs and bump the id on the token after each EOS.
    expected, current = [], 0
    for tok in stream[:-1]:
        expected.append(current)
        if tok == EOS:
            current += 1
    assert item["sequence_id"].tolist() == expected == [0, 0, 0, 1, 1, 2, 3, 3]


def test_get_batch_stacks_the_same_samples_as_getitem(folder):
    path, _ = folder
    ds = TokenDataset(path, seq_len=10, with_sequence_id=True)
    idx = [3, 0, len(ds) - 1, 3]
    batch = ds.get_batch(idx)
    for key in ("input_ids", "labels", "sequence_id"):
        assert batch[key].shape == (4, 10)
        assert torch.equal(batch[key], torch.stack([ds[i][key] for i in idx]))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_pickles_without_copying_the_shards(folder):
    import pickle

    path, _ = folder
    ds = TokenDataset(path, seq_len=8)
    ds[0]  # opens the memory maps
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    assert torch.equal(pickle.loads(blob)[5]["labels"], ds[5]["labels"])
