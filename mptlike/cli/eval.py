"""mptlike-eval: loss and perplexity on prepared token shards, or downstream tasks through lm-eval.

    mptlike-eval CHECKPOINT --data DATA_DIR [--split val] [--seq-len N] [--batch-size B] [--max-batches K]
    mptlike-eval CHECKPOINT --tasks hellaswag,lambada_openai,my_task.yaml [--num-fewshot K] [--limit N]

The numbers are the trainer's validation numbers: the split is cut into the same fixed-length
windows the trainer reads (window i = tokens[i*S : i*S + S + 1], inputs its first S tokens and
targets its last S), and the loss is the mean next-token cross-entropy over every target token,
computed by the trainer's own evaluation function. Perplexity is exp(loss).

With --tasks, EleutherAI's lm-evaluation-harness (pip install 'mptlike[eval]') runs the tasks on the
checkpoint directly (mptlike.integrations.lm_eval), with the tokenizer of its run, and prints
lm-eval's table (or, with --json, its results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Sequence

import torch

from mptlike.cli import add_verbose, int_at_least, pick_device, positive_int, run_command
from mptlike.errors import MptlikeError
from mptlike.integrations.checkpoint_io import TokenizerSource, load_checkpoint_tokenizer, read_checkpoint
from mptlike.integrations.lm_eval_tasks import dataset_error, require_lm_eval, resolve_tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptlike-eval",
        description="Loss and perplexity of a checkpoint on prepared token shards (--data), or lm-eval tasks "
        "(--tasks).",
    )
    add = parser.add_argument
    add("checkpoint", metavar="CHECKPOINT", help="save_pretrained folder, run folder, step-N folder or HF MPT folder")
    add("--data", metavar="DATA_DIR", help="a folder written by mptlike-prep (loss mode; required without --tasks)")
    add("--split", default="val", help="which split of DATA_DIR (default val)")
    add("--seq-len", type=positive_int, default=None, help="window length (default: the model's max_seq_len)")
    add("--batch-size", type=positive_int, default=8, help="windows (or lm-eval requests) per forward pass (default 8)")
    add("--max-batches", type=positive_int, default=None, help="stop after this many batches (default: all)")
    add("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    add("--precision", default="auto", help="auto (bf16 autocast on a bf16 GPU, else fp32), fp32 or bf16")
    add("--json", action="store_true", help="print one JSON object instead of a table")
    tasks = parser.add_argument_group("downstream tasks (lm-eval)")
    tasks.add_argument("--tasks", metavar="TASKS",
                       help="comma-separated lm-eval task or group names and/or task YAML files")
    tasks.add_argument("--num-fewshot", type=non_negative_int, default=None, help="examples in each prompt (default: "
                       "each task's own)")
    tasks.add_argument("--limit", type=limit_value, default=None, help="score only the first N examples of each task "
                       "(or a fraction, e.g. 0.1); for testing, not for reporting")
    tasks.add_argument("--include-path", action="append", default=[], metavar="DIR",
                       help="another folder of task YAMLs (repeatable)")
    tasks.add_argument("--tokenizer", metavar="SPEC", help="override the run's tokenizer: bytes, a tokenizer.json, "
                       "or bpe:N with --tokenizer-data")
    tasks.add_argument("--tokenizer-data", metavar="DIR", help="data folder holding a trained bpe:N tokenizer")
    add_verbose(parser)
    return parser


non_negative_int = int_at_least(0)


def limit_value(text: str) -> int | float:
    """A count of examples (an integer >= 1) or a fraction of each task (0 < x < 1), as lm-eval reads it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value >= 1 and value.is_integer():
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text} must be a whole number of examples or a fraction between 0 and 1")


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
    if args.tasks is not None:
        return run_tasks(args)
    if args.data is None:
        raise MptlikeError("pass --data DATA_DIR (loss and perplexity) or --tasks TASKS (lm-eval tasks)")
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


# ---- downstream tasks ---------------------------------------------------------------------------


def _table(results: dict) -> str:
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def run_tasks(args: argparse.Namespace) -> int:
    require_lm_eval("--tasks")
    # lm-eval logs every step at INFO; keep it to warnings unless asked.
    logging.getLogger("lm_eval").setLevel(logging.INFO if args.verbose else logging.WARNING)
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from mptlike.integrations.lm_eval import MptlikeLM

    ckpt = read_checkpoint(args.checkpoint)
    override = TokenizerSource(spec=args.tokenizer, data_dir=args.tokenizer_data) if args.tokenizer else None
    tokenizer = load_checkpoint_tokenizer(ckpt, override, name=args.checkpoint)
    tasks, manager = resolve_tasks(args.tasks.split(","), args.include_path)
    device = pick_device(args.device)  # a GPU asked for here and missing is an error, not the CPU
    lm = MptlikeLM(
        checkpoint=ckpt, tokenizer=tokenizer, batch_size=args.batch_size, device=str(device), precision=args.precision
    )
    try:
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            log_samples=False,
        )
    except (FileNotFoundError, ConnectionError) as exc:
        raise dataset_error(exc) from None
    if results is None:  # only ranks other than 0 get None; this is a single process
        return 1
    results.pop("samples", None)
    if args.json:
        print(json.dumps(results, default=handle_non_serializable))
        return 0
    print(f"mptlike ({ckpt.path}, {lm.precision} on {lm.device}), limit: {args.limit}, num_fewshot: "
          f"{args.num_fewshot}, batch_size: {args.batch_size}")
    print(_table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
