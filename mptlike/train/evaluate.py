"""Validation loss and perplexity on the held-out split, identical at every world size.

The same first `max_samples` sequences of the val split are scored every time; rank r takes
samples r, r + W, r + 2W, ... so the union over ranks is independent of W. Every rank runs the
same number of forward passes (FSDP2 all-gathers are collective), and token-weighted sums are
all-reduced, so val/loss is the mean over all scored tokens.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from mptlike.data import Manifest, TokenDataset

log = logging.getLogger(__name__)


def open_val_split(data_path, *, seq_len: int, with_sequence_id: bool) -> TokenDataset | None:
    """The val split as samples of seq_len, or None (with a warning) when it cannot give one."""
    if Manifest.load(data_path).num_tokens.get("val", 0) <= seq_len:
        log.warning("%s has no usable val split: validation is skipped", data_path)
        return None
    return TokenDataset(data_path, "val", seq_len=seq_len, with_sequence_id=with_sequence_id)


def rank_indices(num_samples: int, max_samples: int, rank: int, world_size: int) -> list[int]:
    """The val samples rank `rank` scores: r, r + W, r + 2W, ... over the first max_samples, the same
    count on every rank (a sharded forward is collective)."""
    per_rank = min(max_samples, num_samples) // world_size
    return list(range(rank, per_rank * world_size, world_size))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TokenDataset,
    *,
    max_samples: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> dict[str, float]:
    indices = rank_indices(len(dataset), max_samples, rank, world_size)
    per_rank = len(indices)
    if per_rank == 0:
        return {}
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for start in range(0, per_rank, micro_batch_size):
            batch = dataset.get_batch(indices[start : start + micro_batch_size])
            labels = batch["labels"].to(device)
            sequence_id = batch.get("sequence_id")
            out = model(
                batch["input_ids"].to(device),
                labels=labels,
                sequence_id=None if sequence_id is None else sequence_id.to(device),
            )
            count = (labels != -100).sum()
            loss_sum += out.loss.double() * count
            tokens += count
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(tokens)
    loss = (loss_sum / tokens).item()
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 80.0))}


def open_val_sources(sources, *, seq_len: int, with_sequence_id: bool) -> dict[str, TokenDataset] | None:
    """The val split of every source of a mixture (data.sources) that has one, by source name; None if none has."""
    out = {}
    for source in sources:
        val = open_val_split(source.path, seq_len=seq_len, with_sequence_id=with_sequence_id)
        if val is not None:
            out[source.name] = val
    return out or None


def evaluate_sources(model: nn.Module, datasets: dict[str, TokenDataset], *, max_samples: int, micro_batch_size: int,
                     rank: int, world_size: int, device: torch.device) -> dict[str, float]:
    """`evaluate` on each source's val split (its first max_samples sequences): val/<name>/loss and perplexity,
    and val/loss over every scored token of all sources (each source weighs by the tokens it scored)."""
    metrics: dict[str, float] = {}
    loss_sum = tokens = 0.0
    for name, dataset in datasets.items():
        scored = evaluate(model, dataset, max_samples=max_samples, micro_batch_size=micro_batch_size, rank=rank,
                          world_size=world_size, device=device)
        if not scored:
            continue
        metrics[f"val/{name}/loss"] = scored["val/loss"]
        metrics[f"val/{name}/perplexity"] = scored["val/perplexity"]
        count = len(rank_indices(len(dataset), max_samples, 0, world_size)) * world_size * dataset.seq_len
        loss_sum += scored["val/loss"] * count
        tokens += count
    if tokens:
        loss = loss_sum / tokens
        metrics = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 80.0)), **metrics}
    return metrics
