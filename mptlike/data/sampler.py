"""A shuffled sample order that costs O(1) memory, whatever the dataset size.

Each epoch's order is a pseudo-random permutation of [0, N) keyed by (seed, epoch): a Feistel
network on the smallest power of two >= N, with cycle walking to stay inside [0, N). Any
position of any epoch is computed directly, so resuming never replays the past and no index
array of N entries is ever built.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_ROUNDS = 6
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    """A 64-bit integer hash (the splitmix64 output function); used to derive keys."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A keyed 64-bit hash of every element (splitmix64 finalizer), wrapping arithmetic."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class EpochPermutation:
    """The bijection position -> sample index of [0, n) for one (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        if n < 1:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._hi = bits // 2  # width of the half that gets the round function applied
        self._lo = bits - self._hi
        base = splitmix64((seed & _MASK64) ^ splitmix64(epoch & _MASK64))
        self._keys = [np.uint64(splitmix64(base + r)) for r in range(_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        lo, hi = np.uint64(self._lo), np.uint64(self._hi)
        mask_lo = np.uint64((1 << self._lo) - 1)
        mask_hi = np.uint64((1 << self._hi) - 1)
        for key in self._keys:
            left, right = x >> lo, x & mask_lo
            # Each round is invertible: right moves up unchanged, so the new low part
            # can be unmixed by recomputing the same hash of it.
            x = (right << hi) | ((left ^ _mix(right, key)) & mask_hi)
        return x

    def __call__(self, positions: np.ndarray | int) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        y = self._encrypt(np.atleast_1d(pos).astype(np.uint64))
        # Cycle walking: re-encrypt values that land outside [0, n); since the network is a
        # bijection on [0, 2**bits), walking from an in-range start always returns in range
        # and the result is a bijection on [0, n). At most ~2 steps on average.
        out = y
        bad = np.flatnonzero(out >= np.uint64(self.n))
        while bad.size:
            out[bad] = self._encrypt(out[bad])
            bad = bad[out[bad] >= np.uint64(self.n)]
        return out.reshape(pos.shape).astype(np.int64)

    def __len__(self) -> int:
        return self.n


def global_sample_indices(start: int, count: int, n: int, seed: int) -> np.ndarray:
    """Dataset indices of global stream positions [start, start + count).

    The stream runs epoch after epoch: position g belongs to epoch g // n and is sample
    permutation(seed, epoch)(g % n).
    """
    out = np.empty(count, dtype=np.int64)
    g, done = start, 0
    while done < count:
        epoch, pos = divmod(g, n)
        take = min(count - done, n - pos)
        perm = EpochPermutation(n, seed, epoch)
        out[done : done + take] = perm(np.arange(pos, pos + take, dtype=np.int64))
        done += take
        g += take
    return out
