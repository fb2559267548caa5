"""Command-line entry points: mptlike-convert, mptlike-generate, mptlike-eval.

Every command turns an MptlikeError into one line on stderr and exit code 2, with no traceback:
the message already names the file or value and the fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import torch

from mptlike.errors import EXIT_USAGE, MptlikeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def run_command(
    parser: argparse.ArgumentParser,
    handler: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None,
) -> int:
    """Parse, set up logging, run; the exit code (0; 2 for a user error; 1 for an OS error)."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format=f"{parser.prog}: %(message)s",
        stream=sys.stderr,
    )
    try:
        return handler(args) or 0
    except MptlikeError as exc:
        message = " ".join(str(exc).split())
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        # Disk full, permission denied, ...: the environment's fault, so no traceback either.
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and written")


def pick_device(name: str) -> torch.device:
    """auto: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MptlikeError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MptlikeError(f"--device {name} asks for a GPU but CUDA is not available here: use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a GPU that supports it, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise MptlikeError(f"--dtype {name!r} is unknown: choose auto, float32, bfloat16 or float16")
    return DTYPES[key]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


positive_int = int_at_least(1)
