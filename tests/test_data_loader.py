import itertools

import numpy as np
import pytest
import torch

from mptlike.data import TokenDataset, build_loader
from mptlike.data.sampler import EpochPermutation
from mptlike.data.shards import write_token_folder
from mptlike.errors import MptlikeError

SEQ = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # Token t at stream position t (mod vocab) makes each sample identify itself by its first id.
    path = tmp_path_factory.mktemp("data")
    n_samples = 48
    stream = np.arange(n_samples * SEQ + 1) % 60000
    write_token_folder(path, {"train": [stream]}, tokenizer="t", vocab_size=60000, eos_id=0, shard_tokens=64)
    ds = TokenDataset(path, seq_len=SEQ)
    assert len(ds) == n_samples
    return ds


def _sample_ids(batch):
    return (batch["input_ids"][:, 0] // SEQ).tolist()


def _global_order(ds, world_size, n_global_batches, g=8, mb=1, seed=3, state=None, **kw):
    """Interleave all ranks' micro-batches back into the global order, one global batch at a time."""
    loaders = [
        build_loader(ds, global_batch_size=g, micro_batch_size=mb, rank=r, world_size=world_size, seed=seed, **kw)
        for r in range(world_size)
    ]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    iters = [iter(loader) for loader in loaders]
    order = []
    for _ in range(n_global_batches):
        for it, loader in zip(iters, loaders):
            for _ in range(loader.accumulation_steps):
                order += _sample_ids(next(it))
    return order, loaders


def test_one_epoch_is_the_reference_permutation_for_world_sizes_1_2_4(dataset):
    n = len(dataset)
    # 48 samples, global batch 8: six global batches are exactly one epoch.
    reference = EpochPermutation(n, seed=3, epoch=0)(np.arange(n)).tolist()
    for world_size in (1, 2, 4):
        order, _ = _global_order(dataset, world_size, 6, g=8)
        assert order == reference
        assert sorted(order) == list(range(n))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_take_contiguous_slices_of_the_same_global_stream(dataset, world_size):
    n = len(dataset)
    reference = np.concatenate([EpochPermutation(n, 3, e)(np.arange(n)) for e in range(2)]).tolist()
    order, loaders = _global_order(dataset, world_size, 7, g=8, mb=1)
    assert order == reference[:56]
    assert loaders[0].accumulation_steps == 8 // world_size


def test_resume_at_world_size_4_continues_a_run_saved_at_world_size_2(dataset):
    full, _ = _global_order(dataset, 1, 12, g=8)
    k = 5
    _, saved = _global_order(dataset, 2, k, g=8, mb=2)
    state = saved[0].state_dict()
    assert state["samples_consumed"] == k * 8
    assert state == saved[1].state_dict()
    rest, _ = _global_order(dataset, 4, 12 - k, g=8, mb=1, state=state)
    assert rest == full[k * 8 :]


def test_state_counts_only_completed_global_batches(dataset):
    loader = build_loader(dataset, global_batch_size=8, micro_batch_size=2, rank=0, world_size=2, seed=0)
    assert loader.accumulation_steps == 2
    it = iter(loader)
    next(it)
    assert loader.state_dict()["samples_consumed"] == 0
    next(it)
    assert loader.state_dict()["samples_consumed"] == 8
    for _ in range(12):
        next(it)
    assert loader.state_dict()["samples_consumed"] == 56
    assert loader.state_dict()["epoch"] == 1  # 56 of 48 samples: into the second epoch


def test_workers_and_pinned_memory_keep_the_order(dataset):
    plain = build_loader(dataset, global_batch_size=8, micro_batch_size=2, rank=1, world_size=2, seed=11)
    workers = build_loader(
        dataset, global_batch_size=8, micro_batch_size=2, rank=1, world_size=2, seed=11,
        num_workers=2, pin_memory=torch.cuda.is_available(),
    )
    a = list(itertools.islice(iter(plain), 30))
    b = list(itertools.islice(iter(workers), 30))
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_pin_memory_flag_is_accepted_without_cuda_and_keeps_order(dataset):
    plain = build_loader(dataset, global_batch_size=4, micro_batch_size=4, rank=0, world_size=1, seed=2)
    pinned = build_loader(
        dataset, global_batch_size=4, micro_batch_size=4, rank=0, world_size=1, seed=2, pin_memory=True
    )
    for x, y in zip(itertools.islice(iter(plain), 5), itertools.islice(iter(pinned), 5)):
        assert torch.equal(x["input_ids"], y["input_ids"])


def test_global_batch_must_divide_into_micro_batches_per_rank(dataset):
    with pytest.raises(MptlikeError, match="global_batch_size=10"):
        build_loader(dataset, global_batch_size=10, micro_batch_size=2, rank=0, world_size=4, seed=0)
