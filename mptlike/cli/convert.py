"""mptlike-convert: move weights between mptlike checkpoints and Hugging Face MPT folders.

    mptlike-convert to-hf CHECKPOINT OUT_DIR                  ours -> transformers' MptForCausalLM
    mptlike-convert to-hf --remote-code CHECKPOINT OUT_DIR    ours -> llm-foundry's MPTForCausalLM
    mptlike-convert from-hf HF_DIR OUT_DIR                    any MPT checkpoint -> save_pretrained

Everything is read and checked before anything is written; the output appears complete under
OUT_DIR or not at all.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from mptlike.cli import DTYPES, add_verbose, run_command
from mptlike.errors import MptlikeError
from mptlike.integrations import hf, hf_io
from mptlike.integrations.checkpoint_io import (
    TokenizerSource,
    model_from_state,
    read_checkpoint,
    staged_output,
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptlike-convert",
        description="Convert between mptlike checkpoints and Hugging Face MPT folders.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{to-hf,from-hf}")

    to = sub.add_parser(
        "to-hf",
        help="mptlike checkpoint -> folder that transformers.MptForCausalLM.from_pretrained loads",
        description="Write config.json (model_type mpt), model.safetensors and the tokenizer files. "
        "CHECKPOINT is a save_pretrained folder, a run folder, a run's final/ or checkpoints/step-N folder, "
        "or a Composer checkpoint (checkpoints/ep0-baN-rank0.pt or a sharded ep0-baN/ folder).",
    )
    to.add_argument("checkpoint", metavar="CHECKPOINT")
    to.add_argument("out_dir", metavar="OUT_DIR")
    to.add_argument(
        "--remote-code",
        action="store_true",
        help="write llm-foundry's MPT config (attn_config/ffn_config/init_config), which "
        "llmfoundry.models.mpt.MPTForCausalLM.from_pretrained loads (checked with llm-foundry 0.22), for models "
        "using features transformers' MPT lacks (GQA/MQA, qk_ln, expansion_ratio != 4, biases, ...)",
    )
    to.add_argument(
        "--tokenizer", metavar="SPEC", help="tokenizer.json (or its folder) to ship when the run's is unknown"
    )
    to.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="split model.safetensors past this size (default 5)"
    )
    _common(to)

    frm = sub.add_parser(
        "from-hf",
        help="Hugging Face MPT folder (transformers or llm-foundry layout) -> mptlike save_pretrained folder",
        description="Read config.json and model.safetensors / pytorch_model.bin (single or sharded with an "
        "index) and write config.json + model.safetensors that MPTForCausalLM.from_pretrained loads. "
        "HF_DIR is written by transformers' or llm-foundry's save_pretrained (mosaicml/mpt-7b's 2023 layout "
        "too); MPT features mptlike does not build (rope, GLU, RMSNorm, a custom head_dim, ...) are refused.",
    )
    frm.add_argument("hf_dir", metavar="HF_DIR")
    frm.add_argument("out_dir", metavar="OUT_DIR")
    _common(frm)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", default="keep", choices=["keep", *DTYPES], help="store the weights in this dtype (default: as read)"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    add_verbose(parser)


def _cast(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "keep":
        return state
    target = DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"


def _tokenizer_from_arg(spec: str) -> TokenizerSource:
    path = Path(spec).expanduser()
    if path.is_file() and path.name == hf_io.TOKENIZER_JSON:
        return TokenizerSource(spec=str(path), files=[path])
    files = hf_io.tokenizer_files_in(path) if path.is_dir() else []
    if not files:
        raise MptlikeError(f"--tokenizer {spec} is not a tokenizer.json or a folder holding one: point at the file")
    return TokenizerSource(spec=str(path), files=files)


def _eos_token(source: TokenizerSource) -> tuple[int | None, str | None]:
    """EOS id and its string, read from the local tokenizer.json (never from the network)."""
    path = next((p for p in source.files if p.name == hf_io.TOKENIZER_JSON), None)
    if path is None:
        return source.eos_id, None
    eos_id = source.eos_id
    if eos_id is None:
        from mptlike.data.tokenizer import load_tokenizer

        eos_id = load_tokenizer(str(path)).eos_id
    from tokenizers import Tokenizer

    try:
        return eos_id, Tokenizer.from_file(str(path)).id_to_token(eos_id)
    except Exception:  # the Rust library raises a bare Exception for malformed files
        raise MptlikeError(
            f"tokenizer file {path} could not be read: point --tokenizer at a valid tokenizer.json"
        ) from None


def to_hf(args: argparse.Namespace) -> int:
    if args.max_shard_gb <= 0:
        raise MptlikeError(f"--max-shard-gb {args.max_shard_gb} must be positive, e.g. 5")
    ckpt = read_checkpoint(args.checkpoint)
    cfg = ckpt.config
    source = _tokenizer_from_arg(args.tokenizer) if args.tokenizer else ckpt.tokenizer
    eos_id, eos_token = _eos_token(source) if source is not None else (None, None)
    state = _cast(ckpt.model.state_dict(), args.dtype)
    config = hf.to_hf_config(cfg, remote_code=args.remote_code, dtype=_dtype_name(state), eos_token_id=eos_id)
    tensors = hf.to_hf_state_dict(state, cfg)
    with staged_output(args.out_dir, force=args.force) as tmp:
        hf_io.write_hf_folder(tmp, config, tensors, max_shard_bytes=int(args.max_shard_gb * 1024**3))
        copied = hf_io.copy_tokenizer_files(source.files, tmp) if source is not None else []
        if hf_io.TOKENIZER_JSON in copied and "tokenizer_config.json" not in copied:
            hf_io.write_tokenizer_config(tmp, eos_token=eos_token, model_max_length=cfg.max_seq_len)
    layout = "llm-foundry MPTForCausalLM" if args.remote_code else "transformers MptForCausalLM"
    note = "" if source is None or source.files else f" (tokenizer {source.spec!r} has no tokenizer.json to ship)"
    if source is None:
        note = " (no tokenizer known: pass --tokenizer to ship one)"
    print(f"wrote {args.out_dir} ({layout}, {ckpt.model.num_params():,} parameters){note}")
    return 0


def from_hf(args: argparse.Namespace) -> int:
    folder = Path(args.hf_dir)
    where = str(folder / hf_io.CONFIG_NAME)
    info = hf.config_from_hf(hf_io.read_hf_config(folder), where)
    state = hf.state_dict_from_hf(hf_io.read_hf_weights(folder), info, str(folder))
    model = model_from_state(info.config, _cast(state, args.dtype))
    with staged_output(args.out_dir, force=args.force) as tmp:
        model.save_pretrained(tmp)
        hf_io.copy_tokenizer_files(hf_io.tokenizer_files_in(folder), tmp)
    print(f"wrote {args.out_dir} (from the {info.layout} layout, {model.num_params():,} parameters)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_command(parser, lambda args: to_hf(args) if args.command == "to-hf" else from_hf(args), argv)


if __name__ == "__main__":
    raise SystemExit(main())
