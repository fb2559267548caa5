import numpy as np
import pytest

from mptlike.data.sampler import EpochPermutation, global_sample_indices


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 64, 100, 1000, 4097, 65537])
def test_permutation_is_a_bijection_of_range_n(n):
    perm = EpochPermutation(n, seed=1234, epoch=3)(np.arange(n))
    assert np.array_equal(np.sort(perm), np.arange(n))


def test_permutation_changes_with_seed_and_epoch():
    n = 1000
    base = EpochPermutation(n, seed=0, epoch=0)(np.arange(n))
    other_seed = EpochPermutation(n, seed=1, epoch=0)(np.arange(n))
    other_epoch = EpochPermutation(n, seed=0, epoch=1)(np.arange(n))
    assert not np.array_equal(base, np.arange(n))
    assert not np.array_equal(base, other_seed)
    assert not np.array_equal(base, other_epoch)
    # Recomputing from (seed, epoch) reproduces the order exactly.
    assert np.array_equal(base, EpochPermutation(n, seed=0, epoch=0)(np.arange(n)))


def test_permutation_is_well_shuffled():
    # A shuffle leaves few fixed points and no strong correlation with position.
    n = 10_000
    perm = EpochPermutation(n, seed=7)(np.arange(n))
    assert np.sum(perm == np.arange(n)) < 20
    assert abs(np.corrcoef(perm, np.arange(n))[0, 1]) < 0.05


def test_single_positions_match_the_vectorized_call():
    perm = EpochPermutation(777, seed=5, epoch=2)
    full = perm(np.arange(777))
    assert [int(perm(i)) for i in (0, 1, 500, 776)] == [full[0], full[1], full[500], full[776]]


def test_global_stream_runs_one_permutation_per_epoch():
    n = 13
    stream = global_sample_indices(5, 3 * n, n, seed=9)
    expected = np.concatenate([EpochPermutation(n, 9, e)(np.arange(n)) for e in range(4)])[5 : 5 + 3 * n]
    assert np.array_equal(stream, expected)
