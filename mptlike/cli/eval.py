"""mptlike-eval: loss, perplexity and throughput of a checkpoint on prepared token shards.

    mptlike-eval CHECKPOINT --data DATA_DIR [--split val] [--seq-len N] [--batch-size B] [--max-batches K]

The numbers are the trainer's validation numbers: the split is cut into the same fixed-length
windows the trainer reads (window i = tokens[i*S : i*S + S + 1], inputs its first S tokens and
targets its last S), and the loss is the mean next-token cross-entropy over every target token,
computed by the trainer's own evaluation function. Perplexity is exp(loss).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Sequence

import torch

from mptlike.cli import add_verbose, pick_device, positive_int, run_command
from mptlike.errors import MptlikeError
from mptlike.integrations.checkpoint_io import read_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptlike-eval", description="Loss and perplexity of a checkpoint on prepared token shards."
    )
    add = parser.add_argument
    add("checkpoint", metavar="CHECKPOINT", help="save_pretrained folder, run folder, step-N folder or HF MPT folder")
    add("--data", required=True, metavar="DATA_DIR", help="a folder written by mptlike-prep")
    add("--split", default="val", help="which split of DATA_DIR (default val)")
    add("--seq-len", type=positive_int, default=None, help="window length (default: the model's max_seq_len)")
    add("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    add("--max-batches", type=positive_int, default=None, help="stop after this many batches (default: all)")
    add("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    add("--precision", default="auto", help="auto (bf16 autocast on a bf16 GPU, else fp32), fp32 or bf16")
    add("--json", action="store_true", help="print one JSON object instead of a table")
    add_verbose(parser)
    return parser


def _check_tokenizer(ckpt, manifest) -> None:
    """Refuse shards tokenized differently from the checkpoint's training data, when both are known."""
    known = ckpt.tokenizer
    if known is None or known.data_dir is None or manifest.data_dir is None:
        return
    if known.spec != manifest.tokenizer:
        raise MptlikeError(
            f"{ckpt.path} was trained on text tokenized with {known.spec!r} but {manifest.data_dir} was tokenized "
            f"with {manifest.tokenizer!r}: prepare the evaluation text with --tokenizer {known.spec}"
        )
    ours, theirs = known.data_dir / "tokenizer.json", manifest.data_dir / "tokenizer.json"
    if ours.is_file() and theirs.is_file() and ours.read_bytes() != theirs.read_bytes():
        raise MptlikeError(
            f"{theirs} differs from the tokenizer {ckpt.path} was trained with ({ours}): both are {known.spec!r} but "
            "trained on different text; prepare the evaluation text with that tokenizer.json"
        )


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    from mptlike.data import TokenDataset
    from mptlike.parallel.precision import canonical_precision
    from mptlike.train.evaluate import evaluate

    device = pick_device(args.device)
    precision = canonical_precision(args.precision, cuda=device.type == "cuda")
    ckpt = read_checkpoint(args.checkpoint)
    cfg = ckpt.config
    seq_len = args.seq_len or cfg.max_seq_len
    if cfg.learned_pos_emb and seq_len > cfg.max_seq_len:
        raise MptlikeError(
            f"--seq-len {seq_len} exceeds the model's max_seq_len={cfg.max_seq_len} (learned positions): lower it"
        )
    dataset = TokenDataset(
        args.data,
        split=args.split,
        seq_len=seq_len,
        with_sequence_id=cfg.attn_uses_sequence_id,
        expected_vocab_size=cfg.vocab_size,
    )
    _check_tokenizer(ckpt, dataset.manifest)
    windows = len(dataset)
    if args.max_batches is not None:
        windows = min(windows, args.max_batches * args.batch_size)
    # Weights stay fp32 and autocast supplies bf16 compute, as in single-device training.
    model = ckpt.model.to(device=device, dtype=torch.float32)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    start = time.perf_counter()
    with autocast:
        metrics = evaluate(
            model, dataset, max_samples=windows, micro_batch_size=args.batch_size, rank=0, world_size=1, device=device
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    tokens = windows * seq_len
    return {
        "loss": metrics["val/loss"],
        "perplexity": metrics["val/perplexity"],
        "tokens": tokens,
        "windows": windows,
        "seq_len": seq_len,
        "tokens_per_sec": tokens / elapsed if elapsed > 0 else float("inf"),
        "split": args.split,
        "data": str(args.data),
        "precision": precision,
        "device": str(device),
    }


def run(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"loss        {result['loss']:.6f}")
    print(f"perplexity  {result['perplexity']:.4f}")
    print(f"tokens      {result['tokens']} ({result['windows']} windows of {result['seq_len']}, "
          f"split {result['split']} of {result['data']})")
    print(f"tokens/s    {result['tokens_per_sec']:.1f} ({result['device']}, {result['precision']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
