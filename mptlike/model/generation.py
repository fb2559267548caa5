"""Sampling with a KV cache: one forward over the prompt, then one token per step."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from the last-position logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def iter_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    sequence_id: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) until max_new_tokens or every row has emitted eos_id.

    Prompts of different lengths go in left-padded, with ``sequence_id`` (B, S) giving the padding
    another id than the prompt behind it: no prompt token then attends to padding, and with ALiBi
    (relative positions) every row continues exactly as it would alone. Each new token takes the
    id of its row's last position.
    """
    out = model(input_ids, sequence_id=sequence_id, use_cache=True)
    past = out.past_key_values
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        token = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        yield token
        if eos_id is not None and bool(finished.all()):
            return
        if sequence_id is not None:
            sequence_id = torch.cat([sequence_id, sequence_id[:, -1:]], dim=1)
        out = model(token[:, None], sequence_id=sequence_id, past_key_values=past, use_cache=True)
        past = out.past_key_values


def generate(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, **kwargs
) -> torch.Tensor:
    """The prompt followed by the sampled tokens (B, S + new); rows that stopped are padded with eos."""
    was_training = model.training
    model.eval()
    try:
        new = list(iter_generate(model, input_ids, max_new_tokens, **kwargs))
    finally:
        model.train(was_training)
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
