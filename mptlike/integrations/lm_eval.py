"""EleutherAI's lm-evaluation-harness (lm-eval 0.4.x) over mptlike's own model, with no Hugging Face export.

    mptlike-eval RUN --tasks hellaswag,lambada_openai              # the usual way (mptlike.cli.eval)
    python -m mptlike.integrations.lm_eval run --model mptlike --model_args path=RUN --tasks hellaswag
    lm_eval.simple_evaluate(model=MptlikeLM(path=RUN), tasks=["hellaswag"])

`MptlikeLM` answers lm-eval's three request types on `mptlike.model.MPTForCausalLM`, batched, on the
CPU or a GPU (bf16 autocast there, fp32 weights, as in mptlike-eval's loss mode):

- loglikelihood: context + continuation in one forward pass, right-padded; the sum of the
  continuation's log-probabilities and whether greedy decoding would produce it. Context and
  continuation are tokenized as lm-eval's own `hf` model does (TemplateLM), and a pair longer than
  the context window loses tokens on the left, like `hf`.
- loglikelihood_rolling: a whole document in lm-eval's disjoint rolling windows (perplexity tasks).
- generate_until: KV-cache decoding as `mptlike.model.generation` does it (its `sample_next`),
  left-padded batches masked with `sequence_id`; greedy unless the task samples (each sampled batch
  from its own seeded generator); stops at EOS, at any `until` string or after `max_gen_toks`
  tokens; a context too long for the window loses tokens on the left.

`ShardedMptlikeLM` is the same model during training (`eval.tasks`, mptlike.train.tasks): the model
being trained, perhaps FSDP2-sharded, with the batches of each call split over the ranks and the
answers gathered on all of them.

Registration: importing this module registers the name `mptlike` in lm-eval's model registry.
lm-eval 0.4.x finds third-party models no other way (no entry points; `--include_path` only adds
task YAMLs), so a bare `lm_eval --model mptlike` only knows the name where this module was imported
first; `python -m mptlike.integrations.lm_eval ...` is lm-eval's own command line after that import.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mptlike.cli import pick_device
from mptlike.errors import MptlikeError
from mptlike.integrations.checkpoint_io import (
    Checkpoint,
    TokenizerSource,
    load_checkpoint_tokenizer,
    read_checkpoint,
)
from mptlike.model.generation import sample_next

log = logging.getLogger(__name__)

MODEL_NAME = "mptlike"
# The registry imports this path when the name is first used; a placeholder (not the class object)
# also keeps registration idempotent when this file runs as __main__ and is then imported again.
_TARGET = "mptlike.integrations.lm_eval:MptlikeLM"
DEFAULT_MAX_GEN_TOKS = 256  # what lm-eval's hf model generates when a task sets no limit
_AUTO_BATCH_SIZE = 16
SAMPLING_SEED = 1234  # a sampled batch's generator: this plus the batch's number (lm-eval's own seeds are 1234)


def register() -> None:
    """Make `mptlike` a model name lm-eval knows (idempotent)."""
    # lm-eval fills its registry with its own models only when it finds the registry empty, so they
    # go in first: registering alone would hide `hf` and the rest from this process.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=_TARGET)


def _batch_size(value: Any, max_batch_size: Any) -> int:
    text = str(value).strip()
    if text.startswith("auto"):
        chosen = int(max_batch_size) if max_batch_size else _AUTO_BATCH_SIZE
        log.warning("mptlike: batch_size=%s is not searched for; using %d (set batch_size=N)", text, chosen)
        return chosen
    try:
        size = int(text)
    except ValueError:
        raise MptlikeError(f"batch_size={value!r} is not a whole number: pass e.g. batch_size=8") from None
    if size < 1:
        raise MptlikeError(f"batch_size={size} must be at least 1")
    return size


def _pick_device(name: Any) -> torch.device:
    """lm-eval's command line asks for cuda:0 unless told otherwise: without a GPU, that means the CPU."""
    if name and str(name).startswith("cuda") and not torch.cuda.is_available():
        log.warning("mptlike: device=%s but CUDA is not available here; running on the CPU", name)
        name = "cpu"
    return pick_device(str(name) if name else "auto")


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise MptlikeError(f"{name}={value!r} is not a whole number") from None
    if number < 1:
        raise MptlikeError(f"{name}={number} must be at least 1")
    return number


@dataclass
class _GenerationBatch:
    """Prompts decoded together: one setting (greedy or sampled, stop strings, length) for all of them."""

    indices: list[int]  # the requests' places in the call
    prompts: list[list[int]]
    settings: dict[str, Any]
    number: int  # its place among the call's batches: the seed of its sampling


class MptlikeLM(TemplateLM):
    """An mptlike checkpoint as an lm-eval language model.

    model_args (`--model_args key=value,...` or keyword arguments):
        path            run folder, final/ or step-N folder, save_pretrained folder or HF MPT folder
        tokenizer       a tokenizer spec (bytes, bpe:N with tokenizer_data, tokenizer.json) overriding the
                        one the checkpoint's folder or run names
        precision       auto (bf16 autocast on a bf16 GPU, else fp32), fp32 or bf16
        max_length      context window in tokens (default: the model's max_seq_len)
        max_gen_toks    generation limit for tasks that set none (default 256)
    plus lm-eval's own batch_size, max_batch_size and device. Python callers may pass a loaded
    `checkpoint` (a `Checkpoint`) and a loaded `tokenizer` instead of `path`, or a live `model` (one
    being trained, on `device`, perhaps sharded) with its loaded `tokenizer` and the `autocast` context
    factory it computes under.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        checkpoint: Checkpoint | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        tokenizer_data: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        autocast: Callable[[], AbstractContextManager] | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        pretrained: str | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        from mptlike.parallel.precision import canonical_precision

        if unused:
            log.warning("mptlike: ignoring model_args it does not use: %s", ", ".join(sorted(unused)))
        self._autocast_factory = autocast
        if model is not None:
            # A live model is used as it is: its dtype, device and sharding are the trainer's.
            if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
                raise MptlikeError("a live model needs its loaded tokenizer: pass tokenizer=TOKENIZER")
            self.tokenizer = tokenizer
            self.checkpoint_path = None
            self._device = torch.device(device if device is not None else "cpu")
            self.precision = "as trained"
            self.model = model
            self.config = model.config
        else:
            path = path if path is not None else pretrained
            if checkpoint is None:
                if path is None:
                    raise MptlikeError(
                        "the mptlike model needs the checkpoint to evaluate: --model_args path=RUN_OR_CHECKPOINT"
                    )
                checkpoint = read_checkpoint(path)
            if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
                override = TokenizerSource(spec=str(tokenizer), data_dir=tokenizer_data) if tokenizer else None
                tokenizer = load_checkpoint_tokenizer(
                    checkpoint, override, name=path, option="tokenizer=", data_option="tokenizer_data="
                )
            self.tokenizer = tokenizer
            self.checkpoint_path = str(checkpoint.path)
            self._device = _pick_device(None if device is None else str(device))
            self.precision = canonical_precision(str(precision), cuda=self._device.type == "cuda")
            # fp32 weights with bf16 autocast where asked, as mptlike-eval's loss mode and training run them.
            self.model = checkpoint.model.to(device=self._device, dtype=torch.float32).eval()
            self.config = checkpoint.config
        self._batch_size = _batch_size(batch_size, max_batch_size)
        self._max_length = _positive("max_length", max_length) or self.config.max_seq_len
        if self.config.learned_pos_emb and self._max_length > self.config.max_seq_len:
            raise MptlikeError(
                f"max_length={self._max_length} exceeds the model's max_seq_len={self.config.max_seq_len} "
                "(learned positions): lower it"
            )
        self._max_gen_toks = _positive("max_gen_toks", max_gen_toks) or DEFAULT_MAX_GEN_TOKS
        self.quiet = False  # no progress bars, no warnings (ShardedMptlikeLM: ranks other than 0)
        self._cut_contexts = 0

    # ---- what lm-eval reads ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # Our tokenizers add no special tokens; an empty context is handled by TemplateLM (EOS prefix).
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode([t for t in tokens if t != self.eot_token_id])

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_num_parameters": self.model.num_params(),
            "model_dtype": {"bf16": "bfloat16 autocast", "fp32": "float32"}.get(self.precision, self.precision),
            "model_path": self.checkpoint_path,
            "tokenizer": self.tokenizer.name,
        }

    def _autocast(self) -> AbstractContextManager:
        if self._autocast_factory is not None:
            return self._autocast_factory()
        if self.precision == "bf16":
            return torch.autocast(self._device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- scoring ---------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) per (key, context ids, continuation ids)."""
        inputs: list[list[int]] = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise MptlikeError(
                    f"a continuation of {len(continuation)} tokens does not fit the model's window of "
                    f"{self.max_length}: raise max_length (ALiBi models) or shorten the task's targets"
                )
            # The last token is only ever a target; what does not fit the window goes from the left.
            inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
        targets = [continuation for _, _, continuation in requests]
        # Longest first: a batch pads to its first row, and running out of memory shows at once.
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        answers = self._score_batches(batches, inputs, targets, disable_tqdm)
        results = [answers[i] for i in range(len(requests))]
        for (key, _, _), answer in zip(requests, results):
            if key is not None:  # rolling windows have no key of their own
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _score_batches(
        self, batches: list[list[int]], inputs: list[list[int]], targets: list[list[int]], disable_tqdm: bool
    ) -> dict[int, tuple[float, bool]]:
        """The answer of every request index in `batches`, scored batch by batch."""
        answers: dict[int, tuple[float, bool]] = {}
        progress = tqdm(total=len(inputs), disable=disable_tqdm, desc="mptlike loglikelihood")
        for batch in batches:
            answers.update(zip(batch, self._score_batch([inputs[i] for i in batch], [targets[i] for i in batch])))
            progress.update(len(batch))
        progress.close()
        return answers

    @torch.no_grad()
    def _score_batch(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        width = max(len(row) for row in inputs)
        # Right padding: causal attention keeps every real position blind to the padding after it.
        ids = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        for r, row in enumerate(inputs):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        with self._autocast():
            logits = self.model(ids.to(self._device)).logits
        answers = []
        for r, (row, target) in enumerate(zip(inputs, targets)):
            if not target:
                answers.append((0.0, True))
                continue
            # Position t predicts token t + 1: the continuation is predicted by the row's last len(target).
            picked = logits[r, len(row) - len(target): len(row)].float().log_softmax(dim=-1)
            wanted = torch.tensor(target, dtype=torch.long, device=picked.device)
            total = picked.gather(-1, wanted[:, None]).sum()
            greedy = bool((picked.argmax(dim=-1) == wanted).all())
            answers.append((float(total), greedy))
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        texts = self._generate_batches(self._plan_generation(args), disable_tqdm)
        results = [texts[i] for i in range(len(args))]
        for arguments, text in zip(args, results):
            self.cache_hook.add_partial("generate_until", arguments, text)
        return results

    def _plan_generation(self, args: list[tuple[str, dict]]) -> list[_GenerationBatch]:
        """Every batch of the call, in the order they run; the same list wherever it is computed."""
        # One batch never mixes settings (greedy with sampled, different stop strings).
        groups: dict[str, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
        batches: list[_GenerationBatch] = []
        for indices in groups.values():
            settings = self._generation_settings(args[indices[0]][1])
            room = self.max_length - settings["max_new"]
            if room < 1:
                raise MptlikeError(
                    f"max_gen_toks={settings['max_new']} leaves no room for the context in the model's window "
                    f"of {self.max_length} tokens: lower max_gen_toks"
                )
            prompts = {i: self._prompt_ids(args[i][0], room) for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for batch in self._generation_batches(order, prompts):
                batches.append(_GenerationBatch(batch, [prompts[i] for i in batch], settings, len(batches)))
        if self._cut_contexts and not self.quiet:
            log.warning("mptlike: %d of %d contexts lost tokens on the left to fit the window of %d tokens with room "
                        "for the generation", self._cut_contexts, len(args), self.max_length)
        self._cut_contexts = 0
        return batches

    @torch.no_grad()
    def _generate_batches(self, batches: list[_GenerationBatch], disable_tqdm: bool) -> dict[int, str]:
        """The text of every request index in `batches`, decoded batch by batch."""
        texts: dict[int, str] = {}
        progress = tqdm(total=sum(len(b.indices) for b in batches), disable=disable_tqdm,
                        desc="mptlike generate_until")
        with self._autocast():
            for batch in batches:
                decoder = _Decoder(self, batch)
                decoder.prefill()
                while decoder.take():
                    decoder.forward()
                texts.update(zip(batch.indices, decoder.texts()))
                progress.update(len(batch.indices))
        progress.close()
        return texts

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks))
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = int(kwargs.pop("max_gen_toks"))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k = kwargs.pop("top_k", None)
        top_p = kwargs.pop("top_p", None)
        if kwargs:
            log.warning("mptlike: generation ignores %s", ", ".join(sorted(kwargs)))
        return {
            "until": until,
            "max_new": max_new,
            # Greedy unless the task samples at a positive temperature (lm-eval's own reading of the two).
            "temperature": temperature if sample and temperature > 0 else 0.0,
            "top_k": int(top_k) if top_k else None,
            "top_p": float(top_p) if top_p is not None and float(top_p) < 1 else None,
        }

    def _prompt_ids(self, context: str, room: int) -> list[int]:
        ids = self.tok_encode(context)
        if len(ids) > room:
            self._cut_contexts += 1
            ids = ids[-room:]
        return ids or [self.eot_token_id]  # an empty context starts a new document, as mptlike-generate does

    def _generation_batches(self, order: list[int], prompts: dict[int, list[int]]) -> Iterator[list[int]]:
        """Batches of request indices; rows of one length only when positions are learned (padding shifts them)."""
        batch: list[int] = []
        for i in order:
            ragged = batch and len(prompts[i]) != len(prompts[batch[0]])
            if len(batch) == self.batch_size or (ragged and self.config.learned_pos_emb):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch


class _Decoder:
    """One batch decoded with the KV cache, as mptlike.model.generation.iter_generate does it: a forward
    pass over the left-padded prompts (masked with `sequence_id`), then one pass per new token. `take`
    (this step's token, no model call) and `forward` (the next pass) are apart so that ranks sharing a
    sharded model can step together. Greedy unless the settings sample; a sampled batch draws from its
    own generator, seeded by its number, so its text does not depend on what ran before it."""

    def __init__(self, lm: MptlikeLM, batch: _GenerationBatch) -> None:
        self.lm, self.settings = lm, batch.settings
        eos = lm.eot_token_id
        prompts = batch.prompts
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), eos, dtype=torch.long)
        sequence_id = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            ids[r, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            sequence_id[r, width - len(prompt):] = 1
        self.ids = ids.to(lm.device)
        ragged = any(len(p) != width for p in prompts)
        self.sequence_id = sequence_id.to(lm.device) if ragged else None
        self.generator = None
        if self.settings["temperature"] > 0:
            self.generator = torch.Generator(device=lm.device).manual_seed(SAMPLING_SEED + batch.number)
        self.made: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.steps = 0
        self.logits: torch.Tensor | None = None
        self.past: Any = None
        self.token: torch.Tensor | None = None

    def prefill(self) -> None:
        self._run(self.ids)

    def take(self) -> bool:
        """Add this step's token to every unfinished row; True when another forward pass is wanted."""
        s, eos = self.settings, self.lm.eot_token_id
        if self.steps >= s["max_new"] or all(self.done):
            return False
        token = sample_next(self.logits, s["temperature"], s["top_k"], s["top_p"], self.generator)
        self.steps += 1
        for r, value in enumerate(token.tolist()):
            if self.done[r]:
                continue
            if value == eos:
                self.done[r] = True
                continue
            self.made[r].append(value)
            if s["until"] and any(stop in self.lm.tok_decode(self.made[r]) for stop in s["until"]):
                self.done[r] = True
        if all(self.done) or self.steps >= s["max_new"]:
            return False
        # A finished row goes on with EOS, as iter_generate feeds it; rows never see each other.
        self.token = token.masked_fill(torch.tensor(self.done, device=token.device), eos)
        return True

    def forward(self) -> None:
        if self.sequence_id is not None:
            self.sequence_id = torch.cat([self.sequence_id, self.sequence_id[:, -1:]], dim=1)
        self._run(self.token[:, None])

    def _run(self, ids: torch.Tensor) -> None:
        out = self.lm.model(ids, sequence_id=self.sequence_id, past_key_values=self.past, use_cache=True)
        self.logits, self.past = out.logits[:, -1], out.past_key_values

    def texts(self) -> list[str]:
        return [_cut(self.lm.tok_decode(tokens), self.settings["until"]) for tokens in self.made]


def _cut(text: str, until: list[str]) -> str:
    """The text before the first stop string."""
    for stop in until:
        text = text.split(stop)[0]
    return text


class ShardedMptlikeLM(MptlikeLM):
    """A live model on every rank of torch.distributed's default group, each rank scoring its share.

    For evaluation during training (mptlike.train.tasks): every rank runs lm-eval's `evaluate` on the
    whole task set, so lm-eval builds the same requests everywhere and computes its metrics from the
    full list of answers; to lm-eval this model is one process (rank 0 of 1). Inside each call the
    work is split: the requests are cut into batches exactly as one process would cut them (longest
    first), batch b runs on rank b mod world_size, and the answers are all-gathered by request index,
    so every rank returns the answers of all requests, the same as one process would.

    The model may be sharded (FSDP2): a forward pass is then collective (each block all-gathers its
    parameters), so every rank runs as many passes as the busiest one. Scoring: a rank short of a
    batch in the last round runs one pass over a single token and discards it. Generation: ranks
    decode their batches in rounds; after every step the ranks agree (one all-reduce) whether any of
    them still decodes, and a rank whose batch is done (or that has none) runs the same single-token
    pass until all are done. The full model never exists on one rank.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, rank: int, world_size: int, **kwargs: Any) -> None:
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        self.shard_rank, self.shard_world = rank, world_size
        self.quiet = rank != 0

    # Inside a training run: no progress bars (lm-eval asks for them by default).
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=True)

    def _score_batches(self, batches, inputs, targets, disable_tqdm):
        world, rank = self.shard_world, self.shard_rank
        mine = batches[rank::world]
        answers: list[tuple[int, tuple[float, bool]]] = []
        for batch in mine:
            answers += zip(batch, self._score_batch([inputs[i] for i in batch], [targets[i] for i in batch]))
        for _ in range(-(-len(batches) // world) - len(mine)):  # the last round, where a rank has no batch
            self._idle_forward()
        return dict(self._gather(answers))

    @torch.no_grad()
    def _generate_batches(self, batches, disable_tqdm):
        world, rank = self.shard_world, self.shard_rank
        texts: list[tuple[int, str]] = []
        with self._autocast():
            for first in range(0, len(batches), world):
                batch = batches[first + rank] if first + rank < len(batches) else None
                decoder = _Decoder(self, batch) if batch is not None else None
                if decoder is not None:
                    decoder.prefill()
                else:
                    self._idle_forward()
                wants = decoder is not None
                while True:
                    wants = wants and decoder.take()
                    if not self._any_rank(wants):
                        break
                    if wants:
                        decoder.forward()
                    else:
                        self._idle_forward()
                if decoder is not None:
                    texts += zip(batch.indices, decoder.texts())
        return dict(self._gather(texts))

    @torch.no_grad()
    def _idle_forward(self) -> None:
        """A pass over one token whose result is dropped: this rank's part of a collective forward."""
        with self._autocast():
            self.model(torch.full((1, 1), self.eot_token_id, dtype=torch.long, device=self._device))

    def _any_rank(self, flag: bool) -> bool:
        if self.shard_world == 1:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self._device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _gather(self, pairs: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """(request index, answer) pairs of every rank, on every rank."""
        if self.shard_world == 1:
            return pairs
        parts: list[Any] = [None] * self.shard_world
        dist.all_gather_object(parts, pairs)
        return [pair for part in parts for pair in part]


register()


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's own command line, with `--model mptlike` known."""
    from lm_eval.__main__ import cli_evaluate

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
