"""The training loader: a global sample stream, sliced per rank, resumable to the sample.

The order is a property of the data and the seed alone. Global batch k is stream positions
[k*G, (k+1)*G); rank r of W takes [r*G/W, (r+1)*G/W) of it and cuts that into micro-batches.
The state is the number of global samples consumed, so a run resumed at another world size
continues exactly where the old one stopped.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mptlike.data.cache import start_prefetch
from mptlike.data.dataset import TokenDataset
from mptlike.data.sampler import global_sample_indices
from mptlike.errors import MptlikeError

log = logging.getLogger(__name__)


@dataclass
class LoaderState:
    samples_consumed: int
    seed: int
    epoch: int
    num_samples: int
    global_batch_size: int


class _RankMicroBatches(Sampler[list[int]]):
    """Yields this rank's micro-batches of sample indices, forever, from a stream position."""

    def __init__(
        self, num_samples: int, seed: int, start: int, global_batch: int, rank: int,
        world_size: int, micro_batch: int,
    ) -> None:
        self.num_samples, self.seed, self.start = num_samples, seed, start
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.micro_batch = micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch // self.world_size
        g = self.start
        while True:
            first = g + self.rank * per_rank
            idx = global_sample_indices(first, per_rank, self.num_samples, self.seed)
            for j in range(0, per_rank, self.micro_batch):
                yield idx[j : j + self.micro_batch].tolist()
            g += self.global_batch


class _BatchFetch(Dataset):
    """Turns a list of indices into one stacked batch, so collation costs one numpy copy."""

    def __init__(self, dataset: TokenDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.dataset.get_batch(indices)

    def __len__(self) -> int:
        return len(self.dataset)


def _ignore_stop_signals(worker_id: int) -> None:
    """Worker processes take no part in stopping: the training process decides (a SIGTERM sent to the
    whole process group, as SLURM and Ctrl-C do, would otherwise kill the workers mid-batch)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


class ResumableLoader:
    """Iterating yields this rank's micro-batch dicts forever, across epochs.

    `state_dict()` counts global samples of completed global batches: a global batch counts as
    consumed as soon as its last micro-batch has been handed out, so a checkpoint taken after
    the optimizer step resumes at the next global batch.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise MptlikeError(f"rank={rank} must lie in [0, world_size={world_size}).")
        if micro_batch_size < 1:
            raise MptlikeError(
                f"trainer.micro_batch_size={micro_batch_size} must be a positive integer."
            )
        if global_batch_size < 1 or global_batch_size % (micro_batch_size * world_size):
            raise MptlikeError(
                f"trainer.global_batch_size={global_batch_size} must be a positive multiple of "
                f"micro_batch_size * world_size = {micro_batch_size} * {world_size}; pick a "
                "global batch size divisible by that."
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.num_samples = len(dataset)
        self.accumulation_steps = global_batch_size // (micro_batch_size * world_size)
        self.samples_consumed = 0

    @property
    def epoch(self) -> int:
        return self.samples_consumed // self.num_samples

    def _sampler(self) -> Sampler[list[int]]:
        return _RankMicroBatches(
            self.num_samples, self.seed, self.samples_consumed, self.global_batch_size,
            self.rank, self.world_size, self.micro_batch_size,
        )

    def _consumed_global_batch(self) -> None:
        self.samples_consumed += self.global_batch_size

    def batch_ids(self, position: int) -> list[int]:
        """Dataset indices of the global batch that starts at stream position `position`."""
        return global_sample_indices(position, self.global_batch_size, self.num_samples, self.seed).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler = self._sampler()
        loader = DataLoader(
            _BatchFetch(self.dataset),
            batch_size=None,  # the sampler already yields whole micro-batches
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=_identity,
            worker_init_fn=_ignore_stop_signals if self.num_workers else None,
            # Without a generator of its own, every iter() draws a seed from the global RNG: a resumed
            # run (or a rollback) would draw once more than the uninterrupted one and dropout would differ.
            generator=torch.Generator(),
        )
        batches = iter(loader)  # worker processes start here: before the prefetch thread, not forked with it
        # Remote shards: a thread pins the next data.prefetch_shards shards this rank reads (None when local).
        prefetch = start_prefetch(self.dataset, iter(self._sampler()))
        try:
            for i, batch in enumerate(batches):
                if prefetch is not None:
                    prefetch.advance(i + 1)
                if (i + 1) % self.accumulation_steps == 0:
                    # Count before handing out the last micro-batch: the caller steps the optimizer
                    # and checkpoints before asking for more.
                    self._consumed_global_batch()
                yield batch
        finally:
            if prefetch is not None:
                prefetch.close()

    def state_dict(self) -> dict[str, Any]:
        return asdict(
            LoaderState(
                samples_consumed=self.samples_consumed,
                seed=self.seed,
                epoch=self.epoch,
                num_samples=self.num_samples,
                global_batch_size=self.global_batch_size,
            )
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the saved stream.

        World size, micro-batch size and even the global batch size may differ from the saver's:
        the stream is defined per sample, so the next global batch starts at `samples_consumed`.
        """
        consumed = int(state["samples_consumed"])
        saved_n = state.get("num_samples", self.num_samples)
        if saved_n != self.num_samples:
            log.warning(
                "Resuming a sample order saved for %d samples on a dataset of %d; the order "
                "from here on differs from the original run.", saved_n, self.num_samples,
            )
        saved_seed = int(state.get("seed", self.seed))
        if saved_seed != self.seed:
            log.info("Resuming the sample order of seed %d, not the configured %d.",
                     saved_seed, self.seed)
        self.seed = saved_seed
        self.samples_consumed = consumed


def build_loader(
    dataset: TokenDataset,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> ResumableLoader:
    return ResumableLoader(
        dataset,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
