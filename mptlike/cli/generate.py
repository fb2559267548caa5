"""mptlike-generate: sample a continuation from a checkpoint, streaming text as tokens arrive.

    mptlike-generate CHECKPOINT --prompt "def fib(n):" --max-new-tokens 128 --temperature 0.8 --top-k 40

One forward pass over the prompt fills the KV cache; every later step feeds one token. Weights
run in bfloat16 on a GPU and float32 on the CPU unless --dtype says otherwise. The tokenizer is
the one the checkpoint's run was trained with (from its data manifest) or the one shipped in
the checkpoint folder; --tokenizer overrides both.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import torch

from mptlike.cli import add_verbose, pick_device, pick_dtype, run_command
from mptlike.errors import MptlikeError
from mptlike.integrations.checkpoint_io import TokenizerSource, load_checkpoint_tokenizer, read_checkpoint
from mptlike.model.generation import iter_generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptlike-generate", description="Sample text from an mptlike (or Hugging Face MPT) checkpoint."
    )
    add = parser.add_argument
    add("checkpoint", metavar="CHECKPOINT", help="save_pretrained folder, run folder, step-N folder or HF MPT folder")
    add("--prompt", default="", help="text to continue (default: start a new document)")
    add("--max-new-tokens", type=int, default=128)
    add("--temperature", type=float, default=0.8, help="0 picks the most likely token (greedy)")
    add("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 disables")
    add("--top-p", type=float, default=1.0, help="sample within this probability mass; 1 disables")
    add("--tokenizer", metavar="SPEC", help="bytes, bpe:N (with --tokenizer-data), a tokenizer.json or its folder")
    add("--tokenizer-data", metavar="DIR", help="data folder holding a trained bpe:N tokenizer")
    add("--seed", type=int, default=None, help="make sampling repeatable")
    add("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    add("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    add_verbose(parser)
    return parser


def check_sampling_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise MptlikeError(f"--max-new-tokens {args.max_new_tokens} must be 0 or more")
    if args.temperature < 0:
        raise MptlikeError(f"--temperature {args.temperature} must be 0 (greedy) or positive")
    if args.top_k < 0:
        raise MptlikeError(f"--top-k {args.top_k} must be 0 (off) or positive")
    if not 0 < args.top_p <= 1:
        raise MptlikeError(f"--top-p {args.top_p} must be in (0, 1]; 1 disables nucleus sampling")


class StreamDecoder:
    """Turns a growing list of token ids into text pieces that are safe to print.

    A byte-level token can end in the middle of a UTF-8 character; its text then ends in U+FFFD
    until the next token completes it, so such a piece is held back rather than printed wrong.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        # Byte-level BPE and bytes decode prefix-stably, so the new text is what follows the shown text.
        piece = text[len(self.shown):]
        self.shown = text
        return piece


def stream(
    model,
    tokenizer,
    prompt_ids: list[int],
    out: TextIO,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> int:
    """Write the continuation to `out` piece by piece; returns the number of tokens generated."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    decoder = StreamDecoder(tokenizer)
    count = 0
    for token in iter_generate(
        model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_id=tokenizer.eos_id, generator=generator,
    ):
        value = int(token[0])
        count += 1
        if value == tokenizer.eos_id:
            break
        piece = decoder.push(value)
        if piece:
            out.write(piece)
            out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    return count


def tokenizer_override(args: argparse.Namespace) -> TokenizerSource | None:
    """The tokenizer named by --tokenizer (and --tokenizer-data), if any."""
    if not args.tokenizer:
        return None
    return TokenizerSource(spec=args.tokenizer, data_dir=args.tokenizer_data)


def generate(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    ckpt = read_checkpoint(args.checkpoint)
    cfg = ckpt.config
    tokenizer = load_checkpoint_tokenizer(ckpt, tokenizer_override(args), name=args.checkpoint)
    prompt_ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eos_id]
    too_big = [i for i in prompt_ids if i >= cfg.vocab_size]
    if too_big:
        raise MptlikeError(
            f"the tokenizer gives id {too_big[0]} but the model has vocab_size={cfg.vocab_size}: "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )
    total = len(prompt_ids) + args.max_new_tokens
    if cfg.learned_pos_emb and total > cfg.max_seq_len:
        raise MptlikeError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"max_seq_len={cfg.max_seq_len} (learned positions): shorten the prompt or lower --max-new-tokens"
        )
    model = ckpt.model.to(device=device, dtype=dtype)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    start = time.perf_counter()
    count = stream(
        model, tokenizer, prompt_ids, sys.stdout,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p if args.top_p < 1 else None,
        generator=generator,
        device=device,
    )
    elapsed = time.perf_counter() - start
    rate = count / elapsed if elapsed > 0 else float("inf")
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"[{count} tokens in {elapsed:.2f} s, {rate:.1f} tokens/s, {device.type} {dtype_name}]", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), generate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
