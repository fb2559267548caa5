"""Weighted mixtures of prepared data folders: a deterministic, resumable global sample order.

Sources and shares. Each source is a folder written by `mptlike-prep`, with a `weight` (normalised
over the sources) or a `tokens` budget (the weights are then the budgets' shares). An optional
`epochs` cap bounds how often a source repeats: it holds floor(epochs * samples) draws in all.

The schedule. Global batches of B samples are composed one after the other. Within a *segment*
(a stretch of batches with the same active sources, weights and B), source i with weight w_i gets
q_i = floor(w_i * B) samples of every batch plus one more in some batches: the fractional parts
f_i = w_i * B - q_i add up to an integer R, and R of the sources get the extra sample in each
batch. Which ones is Pfair scheduling of tasks of weights f_i on R processors, one batch a slot,
and the PD2 rule (Anderson & Srinivasan: earliest pseudo-deadline, then the b-bit, then the
group deadline) is optimal for it: every source's extra count X_i after t batches stays strictly
within one of t * f_i. Hence, for every batch and source, the batch count is floor or ceil of
w_i * B (within one sample of the weights), and the cumulative count since the segment began is
strictly within one sample of w_i * (samples since then).

Each source draws its samples from its own keyed permutation stream (mptlike.data.sampler, keyed
by the run seed and the source's name) at its own cumulative count, so a source never repeats a
sample before its epoch is over, whatever the weights do. The batch's slots are then interleaved
by a keyed permutation of [0, B), and rank r of W takes slice r of it, as for one folder.

A new segment starts (counters carried over, the schedule's clock reset) when
  - a capped source cannot supply its share of the next batch: it drops out from that batch on and
    the other sources' weights are renormalised among themselves (its unused remainder, fewer than
    ceil(w_i * B) samples, is never drawn);
  - a run resumes with another mixture (data.sources changed: a curriculum or annealing phase) or
    another global batch size: the new weights apply from the resumed step, and each source
    continues its own stream where the checkpoint left it, so nothing seen is repeated early.

The state is O(sources): the samples consumed, each source's count, and where the segment began.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from mptlike.data.dataset import TokenDataset
from mptlike.data.loader import ResumableLoader
from mptlike.data.manifest import Manifest
from mptlike.data.remote import RemoteSettings, is_remote, local_path, open_remote
from mptlike.data.sampler import EpochPermutation, global_sample_indices, splitmix64
from mptlike.errors import MptlikeError

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_LAYOUT_SALT = 0x6D69787475726521  # keys the interleaving of a batch's slots


@dataclass(frozen=True)
class SourceSpec:
    """One validated entry of data.sources."""

    name: str
    path: Path
    weight: float  # as given (or the tokens budget); normalised by the schedule
    epochs: float | None = None


def _key(source: Any, key: str) -> Any:
    if isinstance(source, dict):
        return source.get(key)
    return getattr(source, key, None)


def resolve_sources(sources: Sequence[Any], remote: RemoteSettings | None = None) -> list[SourceSpec]:
    """data.sources (dicts or DataSourceConfig) as SourceSpecs; one MptlikeError line per bad entry.

    A source's path may be a URL (s3://bucket/prefix): its manifest is read here, with `remote`, and the
    spec's path is its local view (mptlike.data.remote)."""
    if not sources:
        raise MptlikeError("data.sources is empty: give at least one {path: DIR, weight: W}")
    specs: list[SourceSpec] = []
    kinds = set()
    for i, src in enumerate(sources):
        where = f"data.sources[{i}]"
        path, weight, tokens, epochs = (_key(src, k) for k in ("path", "weight", "tokens", "epochs"))
        if not path:
            raise MptlikeError(f"{where} has no path: give the folder mptlike-prep wrote, as {{path: DIR, weight: W}}")
        if weight is not None and tokens is not None:
            raise MptlikeError(f"{where} gives both weight={weight} and tokens={tokens}: give one of them")
        kinds.add("tokens" if tokens is not None else "weight")
        value = tokens if tokens is not None else (1.0 if weight is None else weight)
        key = "tokens" if tokens is not None else "weight"
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise MptlikeError(f"{where}.{key}={value} is invalid: use a non-negative number")
        if epochs is not None and (not isinstance(epochs, int | float) or not math.isfinite(epochs) or epochs <= 0):
            raise MptlikeError(f"{where}.epochs={epochs} is invalid: use a positive number of passes, or null (no cap)")
        name = _key(src, "name") or Path(os.path.normpath(str(path).rstrip("/"))).name
        if is_remote(path):
            path = open_remote(str(path), remote, key=f"{where}.path")
        elif not local_path(path).is_dir():
            raise MptlikeError(f"{where}.path={path} does not exist: prepare it with `mptlike-prep INPUT... --out "
                               f"{path}`")
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise MptlikeError(f"{where}.name={name!r} is invalid: use a non-empty name without '/'")
        if any(s.name == name for s in specs):
            raise MptlikeError(f"{where} is named {name!r} like another source: give one of them a distinct name:")
        specs.append(SourceSpec(name, local_path(path), float(value), None if epochs is None else float(epochs)))
    if len(kinds) > 1:
        raise MptlikeError("data.sources mixes weight and tokens: give every source a weight, or every one tokens")
    if not any(s.weight > 0 for s in specs):
        raise MptlikeError(f"data.sources {'tokens' if 'tokens' in kinds else 'weights'} are all zero: give at least "
                           "one source a positive share")
    return specs


def check_same_tokenizer(manifests: Sequence[Manifest], names: Sequence[str]) -> None:
    """All sources must hold ids of one tokenizer: refuse the first pair that differs."""
    first, first_name = manifests[0], names[0]

    def tokenizer_of(m: Manifest) -> tuple:
        file_hash = None
        if m.tokenizer_file and m.data_dir is not None and (m.data_dir / m.tokenizer_file).is_file():
            file_hash = hashlib.sha256((m.data_dir / m.tokenizer_file).read_bytes()).hexdigest()
        return (m.tokenizer, m.vocab_size, m.eos_id, file_hash)

    ref = tokenizer_of(first)
    for m, name in zip(manifests[1:], names[1:]):
        if tokenizer_of(m) != ref:
            what = (f"{m.tokenizer!r}" if m.tokenizer != first.tokenizer else
                    f"another {m.tokenizer!r} tokenizer (vocab {m.vocab_size}, eos {m.eos_id}, or its tokenizer file)")
            raise MptlikeError(
                f"data.sources {first_name!r} ({first.data_dir}) was tokenized with {first.tokenizer!r} but {name!r} "
                f"({m.data_dir}) with {what}: prepare every source with one tokenizer")


def _source_seed(seed: int, name: str) -> int:
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return splitmix64((seed & _MASK64) ^ digest)


def _ceil_div(a: Fraction | int, b: Fraction) -> int:
    return -((-a) // b)


class MixtureSchedule:
    """Composes global batches; its state is the position and per-source counts (see the module doc).

    `names`, `weights`, `num_samples` and `epochs` define the mixture; `seed` keys every stream.
    """

    def __init__(self, names: Sequence[str], weights: Sequence[float], num_samples: Sequence[int],
                 epochs: Sequence[float | None], *, global_batch_size: int, seed: int) -> None:
        self.names = list(names)
        self.raw_weights = [float(w) for w in weights]
        self.num_samples = [int(n) for n in num_samples]
        self.epochs = list(epochs)
        self.capacity = [None if e is None else math.floor(e * n) for e, n in zip(self.epochs, self.num_samples)]
        self.global_batch_size = int(global_batch_size)
        self.seed = seed
        self.seeds = [_source_seed(seed, name) for name in self.names]
        self.offsets = np.concatenate([[0], np.cumsum(self.num_samples)]).astype(np.int64)
        k = len(self.names)
        self.position = 0  # global samples composed so far
        self.consumed = [0] * k  # draws from each source so far (its stream position)
        self.segment_start = 0
        self.segment_base = [0] * k
        self.active = [w > 0 for w in self.raw_weights]
        self._segment_rates()

    # --- the segment's rates --------------------------------------------------------------
    def _segment_rates(self) -> None:
        weights = [Fraction(w) if a else Fraction(0) for w, a in zip(self.raw_weights, self.active)]
        total = sum(weights)
        if total == 0:
            raise MptlikeError(
                f"every source of data.sources reached its epochs cap after {self.position} samples "
                f"(counts {dict(zip(self.names, self.consumed))}): raise data.sources[].epochs, add a source, or "
                "lower trainer.max_steps")
        b = self.global_batch_size
        shares = [w / total * b for w in weights]
        self.share = [float(w / total) for w in weights]
        self.q = [int(s) for s in shares]  # floor: shares are non-negative
        self.f = [s - q for s, q in zip(shares, self.q)]
        self.extra = b - sum(self.q)  # R: an integer, since the shares add up to B exactly

    def _start_segment(self) -> None:
        self.segment_start = self.position
        self.segment_base = list(self.consumed)
        self._segment_rates()

    # --- one batch -------------------------------------------------------------------------
    def _pd2_key(self, i: int, k: int) -> tuple:
        """PD2 priority of source i's k-th extra sample (1-based): smaller sorts first."""
        f = self.f[i]
        deadline = _ceil_div(k, f)
        bbit = deadline - (k // f)
        group = 0
        if f >= Fraction(1, 2) and bbit:  # heavy task: the group deadline breaks ties
            g = 1 - f
            group = _ceil_div(_ceil_div(deadline * g, Fraction(1)), g)
        return (deadline, -bbit, -group, i)

    def _counts(self) -> list[int]:
        """Samples per source in the batch at self.position (the segment is current)."""
        t = (self.position - self.segment_start) // self.global_batch_size
        extra = [self.consumed[i] - self.segment_base[i] - t * self.q[i] for i in range(len(self.names))]
        eligible = []
        for i, f in enumerate(self.f):
            if not self.active[i] or f == 0:
                continue
            k = extra[i] + 1
            if (k - 1) // f <= t:  # pseudo-release reached
                eligible.append(self._pd2_key(i, k))
        eligible.sort()
        if len(eligible) < self.extra:  # PD2 is optimal for a fully used system: never happens
            raise RuntimeError(f"mixture schedule: {len(eligible)} sources eligible for {self.extra} extra samples")
        counts = [q if a else 0 for q, a in zip(self.q, self.active)]
        for key in eligible[: self.extra]:
            counts[key[-1]] += 1
        return counts

    def next_counts(self) -> list[int]:
        """The next batch's counts per source; a capped source that cannot supply its share drops out."""
        if (self.position - self.segment_start) % self.global_batch_size:
            self._start_segment()  # a resume mid-way through a batch of another size
        while True:
            counts = self._counts()
            out = [i for i, c in enumerate(counts)
                   if self.active[i] and self.capacity[i] is not None and self.consumed[i] + c > self.capacity[i]]
            if not out:
                return counts
            for i in out:
                self.active[i] = False
                log.info("data source %r reached its epochs cap (%d samples) at global sample %d; its share goes "
                         "to the other sources from here on", self.names[i], self.consumed[i], self.position)
            self._start_segment()

    def next_batch(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Compose the batch at self.position and advance: (counts, source of each slot, index in its source)."""
        counts = self.next_counts()
        b = self.global_batch_size
        sources = np.empty(b, dtype=np.int64)
        indices = np.empty(b, dtype=np.int64)
        at = 0
        for i, c in enumerate(counts):
            if c:
                sources[at : at + c] = i
                indices[at : at + c] = global_sample_indices(self.consumed[i], c, self.num_samples[i], self.seeds[i])
                self.consumed[i] += c
                at += c
        layout = EpochPermutation(b, self.seed ^ _LAYOUT_SALT, self.position)(np.arange(b))
        self.position += b
        return counts, sources[layout], indices[layout]

    def encode(self, sources: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """(source, index) as one id of the concatenated sources, for MixtureDataset."""
        return self.offsets[sources] + indices

    def describe(self, sources: np.ndarray, indices: np.ndarray) -> list[str]:
        return [f"{self.names[s]}:{i}" for s, i in zip(sources.tolist(), indices.tolist())]

    # --- state -----------------------------------------------------------------------------
    def definition(self) -> dict[str, Any]:
        return {"names": self.names, "weights": self.raw_weights, "epochs": self.epochs,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size}

    def state_dict(self) -> dict[str, Any]:
        return {**self.definition(), "consumed": dict(zip(self.names, self.consumed)),
                "segment_start": self.segment_start, "segment_base": dict(zip(self.names, self.segment_base)),
                "active": [n for n, a in zip(self.names, self.active) if a]}

    def load_state_dict(self, state: dict[str, Any], position: int) -> None:
        """Continue a saved schedule; with another mixture (a new phase), start a segment at `position`."""
        saved_consumed = state.get("consumed", {})
        self.position = position
        self.consumed = [int(saved_consumed.get(n, 0)) for n in self.names]
        for name, n_saved, n in zip(state.get("names", []), state.get("num_samples", []), self.num_samples):
            if name in self.names and n_saved != self.num_samples[self.names.index(name)]:
                log.warning("data source %r had %d samples when saved and has %d now; its order from here on "
                            "differs from the original run", name, n_saved, n)
        same = {k: state.get(k) for k in self.definition()} == self.definition()
        if same:
            base = state["segment_base"]
            self.segment_start = int(state["segment_start"])
            self.segment_base = [int(base[n]) for n in self.names]
            self.active = [n in state["active"] for n in self.names]
            self._segment_rates()
            return
        self.active = [w > 0 and (c is None or self.consumed[i] < c)
                       for i, (w, c) in enumerate(zip(self.raw_weights, self.capacity))]
        log.info("data.sources changed since the checkpoint: a new mixture phase starts at global sample %d "
                 "(weights %s; each source continues its own stream: %s)", position,
                 dict(zip(self.names, self.raw_weights)), dict(zip(self.names, self.consumed)))
        self._start_segment()


class MixtureDataset(torch.utils.data.Dataset):
    """The sources' train splits side by side: id offsets[i] + j is sample j of source i."""

    def __init__(self, datasets: Sequence[TokenDataset], names: Sequence[str]) -> None:
        self.datasets = list(datasets)
        self.names = list(names)
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in self.datasets])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def prefetch_depth(self) -> int:
        return max(d.prefetch_depth for d in self.datasets)

    def remote_shards(self, ids: Sequence[int] | np.ndarray) -> list:
        """The remote shards these samples read (TokenDataset.remote_shards), source by source."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        out = []
        for s in np.unique(which).tolist():
            out += self.datasets[s].remote_shards(ids[which == s] - self.offsets[s])
        return out

    def get_batch(self, ids: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        out: dict[str, torch.Tensor] = {}
        for s in np.unique(which).tolist():
            rows = np.flatnonzero(which == s)
            part = self.datasets[s].get_batch(ids[rows] - self.offsets[s])
            for key, value in part.items():
                if key not in out:
                    out[key] = torch.empty((ids.size, *value.shape[1:]), dtype=value.dtype)
                out[key][torch.from_numpy(rows)] = value
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([int(i)]).items()}


class _MixtureRankMicroBatches(Sampler[list[int]]):
    """This rank's micro-batches of a copy of the schedule, forever (each rank composes every global batch)."""

    def __init__(self, schedule: MixtureSchedule, rank: int, world_size: int, micro_batch: int) -> None:
        self.schedule = copy.deepcopy(schedule)
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        s = self.schedule
        per_rank = s.global_batch_size // self.world_size
        while True:
            try:
                _, sources, indices = s.next_batch()
            except MptlikeError:
                return  # every source is spent: ends here, and the loader says why when this batch is drawn
            ids = s.encode(sources, indices)[self.rank * per_rank : (self.rank + 1) * per_rank]
            for j in range(0, per_rank, self.micro_batch):
                yield ids[j : j + self.micro_batch].tolist()


class MixtureLoader(ResumableLoader):
    """ResumableLoader over a mixture: same slicing and counting, the order from a MixtureSchedule."""

    def __init__(self, dataset: MixtureDataset, schedule: MixtureSchedule, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)  # type: ignore[arg-type]
        self.schedule = schedule
        self._last: tuple[int, list[str]] | None = None  # (position, ids) of the last consumed global batch

    @property
    def epoch(self) -> int:
        return 0  # each source has its own epochs: see state_dict()["mixture"]["consumed"]

    def _sampler(self) -> Sampler[list[int]]:
        return _MixtureRankMicroBatches(self.schedule, self.rank, self.world_size, self.micro_batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Workers make the sampler run ahead of training; it stops silently where the sources are spent
        # (a run may end before that batch), and only a draw of that batch raises the error.
        yield from super().__iter__()
        copy.deepcopy(self.schedule).next_counts()
        raise RuntimeError("the mixture sampler ended before its sources were spent")

    def _consumed_global_batch(self) -> None:
        position = self.schedule.position
        _, sources, indices = self.schedule.next_batch()
        self._last = (position, self.schedule.describe(sources, indices))
        super()._consumed_global_batch()

    def batch_ids(self, position: int) -> list[str]:
        """"source:index" of every sample of the global batch at `position` (the last consumed one or the next)."""
        if self._last is not None and self._last[0] == position:
            return list(self._last[1])
        if position == self.samples_consumed:
            ahead = copy.deepcopy(self.schedule)
            _, sources, indices = ahead.next_batch()
            return ahead.describe(sources, indices)
        raise ValueError(f"the mixture loader knows the batches at {self.samples_consumed} and the one before, "
                         f"not {position}")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["mixture"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed = int(state["samples_consumed"])
        self.seed = int(state.get("seed", self.seed))
        if self.seed != self.schedule.seed:
            saved = self.schedule.state_dict()
            self.schedule = MixtureSchedule(saved["names"], saved["weights"], saved["num_samples"], saved["epochs"],
                                            global_batch_size=self.global_batch_size, seed=self.seed)
        if "mixture" not in state:
            log.warning("the checkpoint was written by a run without data.sources: the mixture starts at global "
                        "sample %d with every source at the start of its stream", consumed)
        self.schedule.load_state_dict(state.get("mixture", {}), consumed)
        self.samples_consumed = consumed
        self._last = None


def open_sources(specs: Sequence[SourceSpec], split: str, *, seq_len: int, with_sequence_id: bool = False,
                 verify: bool = False) -> list[TokenDataset]:
    return [TokenDataset(s.path, split, seq_len=seq_len, with_sequence_id=with_sequence_id, verify=verify)
            for s in specs]


def build_mixture_loader(specs: Sequence[SourceSpec], *, seq_len: int, with_sequence_id: bool, global_batch_size: int,
                         micro_batch_size: int, rank: int, world_size: int, seed: int, num_workers: int = 0,
                         pin_memory: bool = False) -> MixtureLoader:
    datasets = open_sources(specs, "train", seq_len=seq_len, with_sequence_id=with_sequence_id)
    schedule = MixtureSchedule([s.name for s in specs], [s.weight for s in specs], [len(d) for d in datasets],
                               [s.epochs for s in specs], global_batch_size=global_batch_size, seed=seed)
    return MixtureLoader(MixtureDataset(datasets, [s.name for s in specs]), schedule,
                         global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, rank=rank,
                         world_size=world_size, seed=seed, num_workers=num_workers, pin_memory=pin_memory)
