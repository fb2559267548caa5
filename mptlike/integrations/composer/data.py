"""Our data as Composer sees it: the resumable loader (one global batch's share per step) and the val split.

Each Composer batch is one rank's share of one global batch (global_batch_size / world sequences);
Composer cuts it into micro-batches of trainer.micro_batch_size, in order, which are exactly the
micro-batches the Lightning loop draws. The loader's position travels in Composer's checkpoint
through the `state_dict` / `load_state_dict` protocol Composer calls on a DataLoader's dataset, so
resuming never replays ("spins") the data already seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from mptlike.data import ResumableLoader, TokenDataset
from mptlike.train.evaluate import open_val_split, rank_indices
from mptlike.train.plan import RunPlan


class LoaderDataset(IterableDataset):
    """Our ResumableLoader behind the dataset protocol Composer checkpoints and restores.

    Composer calls `state_dict(num_samples, from_beginning)` on a DataLoader's dataset when it saves
    and `load_state_dict(obj)` when it resumes; the loader counts its own samples, so both
    arguments are ignored.
    """

    def __init__(self, loader: ResumableLoader) -> None:
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.loader)

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        self.loader.load_state_dict(obj)


def composer_dataloader(loader: ResumableLoader) -> DataLoader:
    """A DataLoader that hands Composer one item of `loader` per step and nothing ahead of it.

    No workers and no prefetch here (the loader has its own), so the loader's position at a
    checkpoint is exactly the number of global batches trained.
    """
    if loader.accumulation_steps != 1:
        raise ValueError("build the Composer loader with micro_batch_size = global_batch_size / world_size")
    return DataLoader(LoaderDataset(loader), batch_size=None, num_workers=0)


class _EvalBatches(IterableDataset):
    """This rank's validation samples in micro-batches; an iterable, as each rank already has its own share."""

    def __init__(self, dataset: TokenDataset, indices: list[int], batch_size: int) -> None:
        super().__init__()
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size

    def __len__(self) -> int:
        # Composer needs the number of evaluation batches to know when an evaluation ends.
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.dataset.get_batch(self.indices[start : start + self.batch_size])


def eval_dataloader(plan: RunPlan, rank: int, world: int) -> DataLoader | None:
    """The samples mptlike.train.evaluate scores (rank r: r, r + W, r + 2W, ...), or None without validation."""
    cfg = plan.cfg
    if not (cfg.eval.every_n_steps or cfg.eval.at_end):
        return None
    val = open_val_split(plan.data.path, seq_len=plan.model_config.max_seq_len,
                         with_sequence_id=plan.model_config.attn_uses_sequence_id)
    indices = rank_indices(len(val), cfg.eval.max_samples, rank, world) if val is not None else []
    if not indices:
        return None
    return DataLoader(_EvalBatches(val, indices, cfg.trainer.micro_batch_size), batch_size=None, num_workers=0)
