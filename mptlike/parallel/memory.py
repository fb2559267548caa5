"""Per-rank peak memory of one training step, before anything is allocated.

An analytic model of what the step keeps alive, phase by phase (the end of the forward pass, the
loss's backward, the backward of each block, the optimizer step), built from the tensors our code
actually saves: nothing runs, so it answers in milliseconds for any model size and world size.
The peak is the largest phase; its breakdown is reported as parameters (the fp32 shard, plus
FSDP2's gathered copies or autocast's low-precision copies), gradients (the fp32 shard, plus
FSDP2's unsharded gradients and reduce-scatter buffers), optimizer state, and activations (saved
for backward, the logits and the loss's scratch, a recomputed block and the gradients flowing
through it). tests/test_parallel_memory.py holds it to the peak measured on CPU, on one process and
under FSDP2 over torch's fake process group.

What it assumes about the code: FSDP2 reduce-scatters gradients after every micro-batch (so they
stay sharded during accumulation) unless parallel.accumulate_unsharded, blocks keep no (k, v) unless
a cache is wanted, the residual stream is kept in the compute dtype, sdpa's ALiBi mask is built once
per forward and shared by the layers, and the last block stays gathered after forward
(mptlike.parallel.apply_fsdp). On CUDA it assumes FSDP2's streams hold one more gathered block and
one more reduce-scatter input than on CPU, which only a GPU run can confirm
(benchmarks/memory_check.py, part of `make gpu-check`). What it leaves out: the CUDA
context (~0.5-1 GB), NCCL's buffers, the caching allocator's fragmentation and reserve, cuBLAS and
attention-kernel workspaces, and torch.compile's own buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel.parallelize import ParallelPlan
from mptlike.parallel.precision import PrecisionPlan

GB = 1e9
FP32 = 4
# The fused loss (mptlike.ops.loss) walks the logits in chunks of this many elements.
_LOSS_CHUNK_ELEMENTS = 1 << 24
# Backends whose memory grows with seq (they save the output and a log-sum-exp), not seq^2.
_FLASH_CLASS = ("triton", "flash", "flex")


@dataclass(frozen=True)
class Breakdown:
    """Bytes held by one rank at one moment of the step."""

    parameters: float
    gradients: float
    optimizer_state: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer_state + self.activations


@dataclass(frozen=True)
class MemoryEstimate:
    peak_phase: str
    peak: Breakdown
    phases: dict[str, Breakdown]
    facts: dict[str, str] = field(default_factory=dict)  # the inputs, as the report prints them

    @property
    def peak_bytes(self) -> float:
        return self.peak.total

    def report(self) -> str:
        """`key: value` lines ending with `peak_memory_gb_per_rank: X` (GB = 1e9 bytes)."""
        p = self.peak
        lines = [f"{key}: {value}" for key, value in self.facts.items()]
        lines += [
            f"peak_phase: {self.peak_phase}",
            f"parameters_gb: {p.parameters / GB:.2f}",
            f"gradients_gb: {p.gradients / GB:.2f}",
            f"optimizer_state_gb: {p.optimizer_state / GB:.2f}",
            f"activations_gb: {p.activations / GB:.2f}",
            "not_counted: CUDA context (~0.5-1 GB), NCCL buffers, allocator fragmentation, kernel workspaces",
            f"peak_memory_gb_per_rank: {p.total / GB:.2f}",
        ]
        return "\n".join(lines)


def _attention_class(cfg: MPTConfig, device: str) -> str:
    if cfg.attn_impl == "auto":  # mptlike.ops.resolve_attn_impl: triton or flex on CUDA, else sdpa
        return "flash" if device == "cuda" and cfg.attn_pdrop == 0 else "sdpa"
    return "flash" if cfg.attn_impl in _FLASH_CLASS else cfg.attn_impl


def _block_activation_bytes(cfg: MPTConfig, batch: int, seq: int, c: int, attn: str, tp: int = 1) -> float:
    """What one block's forward saves for its backward when it is not checkpointed.

    Per token, in the compute dtype: the two norms' inputs and outputs (4 d), the fused qkv
    (d + 2 kv), the attention output (d), the MLP's up projection and its GELU (2 ffn); plus the
    attention backend's own state. Under tensor parallelism (tp > 1) a rank keeps 1/tp of the
    tokens of the norms and of the heads and MLP columns, but the attention's and the MLP's inputs
    whole: they are all-gathered over the sequence and the column-wise layers save them.
    """
    d, tokens = cfg.d_model, batch * seq
    kv = cfg.kv_n_heads * cfg.head_dim
    per_token = 2 * d + (3 * d + (d + 2 * kv) + 2 * cfg.ffn_hidden_size) / tp
    if cfg.qk_ln:  # refused with tp > 1 (mptlike.parallel.tensor_parallel)
        per_token += d + kv
    if cfg.clip_qkv is not None:
        per_token += (d + 2 * kv) / tp
    total = tokens * c * per_token + 2 * 2 * tokens * FP32 / tp  # + the norms' mean and rstd
    if cfg.resid_pdrop > 0:
        total += 2 * tokens * d / tp  # boolean masks
    grouped = cfg.kv_n_heads != cfg.n_heads
    masked = cfg.alibi or cfg.attn_uses_sequence_id
    rows = batch if cfg.attn_uses_sequence_id else 1
    heads = cfg.n_heads / tp
    square = heads * seq * seq
    if attn == "flash":
        total += tokens * heads * FP32  # log-sum-exp
    elif attn == "sdpa":
        total += tokens * heads * FP32
        if cfg.attn_uses_sequence_id:
            # Each layer's own mask: the shared ALiBi bias merged with the documents (B, H, S, S),
            # or without ALiBi a boolean (B, 1, S, S).
            total += batch * square * c if cfg.alibi else batch * seq * seq
        if masked and grouped:
            total += 2 * tokens * d * c / tp  # with a mask, grouped kv heads are repeated to full width
    else:  # the fp32 reference: probabilities, the mask, fp32 copies of q, k, v
        total += batch * square * FP32 + rows * seq * seq
        total += tokens * (d + 2 * kv) * FP32 / tp if c != FP32 else 0
        total += 2 * tokens * d * c / tp if grouped else 0
    return total


# The parameters of a block that tensor parallelism splits over its ranks (the rest, norms and the
# row-wise layers' biases, every rank holds whole).
_TP_SPLIT = ("attn.Wqkv.weight", "attn.Wqkv.bias", "attn.out_proj.weight", "ffn.up_proj.weight", "ffn.up_proj.bias",
             "ffn.down_proj.weight")


def block_parameters_per_rank(cfg: MPTConfig, tp: int = 1) -> float:
    """The parameters of one block that a rank holds under tensor parallelism over `tp` ranks (before FSDP2)."""
    with torch.device("meta"):
        block = MPTForCausalLM(cfg).transformer.blocks[0]
    return sum(p.numel() / (tp if name in _TP_SPLIT else 1) for name, p in block.named_parameters())


def _loss_scratch(tokens: int, vocab: int, c: int) -> tuple[float, float]:
    """fp32 scratch of the chunked cross-entropy: (forward, backward), beyond the saved logits."""
    rows = max(1, _LOSS_CHUNK_ELEMENTS // vocab)
    chunk = min(tokens, rows) * vocab * FP32
    n_chunks = math.ceil(tokens / rows)
    upcast = chunk if c != FP32 else 0  # logits[rows].float() is a copy only for 16-bit logits
    forward = upcast + chunk  # the upcast chunk and its log-softmax
    backward = upcast + chunk  # the upcast chunk and its softmax
    if n_chunks > 1:  # the per-chunk gradients, then torch.cat of them
        backward = max(backward + tokens * vocab * c, 2 * tokens * vocab * c)
    return forward, backward


def _optimizer_bytes(name: str, impl: str, device: str, local_params: float, largest: float) -> tuple[float, float]:
    """(state, scratch during step) in bytes for `local_params` fp32 parameters on this rank."""
    moments = 2 if name == "decoupled_adamw" else 1
    if impl == "auto":
        impl = "fused" if device == "cuda" else "foreach"
    if name == "decoupled_adamw" and impl == "fused":
        scratch = 0.0
    elif impl == "for":
        scratch = largest * FP32
    else:  # foreach: one fp32 temporary per parameter (Adam's sqrt(v), Lion's interpolation)
        scratch = local_params * FP32
    return moments * local_params * FP32, scratch


def estimate_training_memory(
    cfg: MPTConfig,
    *,
    micro_batch: int,
    precision: PrecisionPlan,
    parallel: ParallelPlan,
    world_size: int = 1,
    accumulation_steps: int = 1,
    optimizer: str = "decoupled_adamw",
    optimizer_impl: str = "auto",
    device: str = "cuda",
    seq_len: int | None = None,
    tp: int = 1,
) -> MemoryEstimate:
    """Per-rank peak of one optimizer step: `accumulation_steps` forward/backward passes of
    `micro_batch` x `seq_len` tokens, gradient clipping and the optimizer step.

    `precision` and `parallel` are the plans training resolves; `world_size > 1` means FSDP2 full
    sharding over that many ranks (parameters, gradients and optimizer state divided among them);
    `tp > 1` tensor parallelism over that many more (the blocks' matrices and activations split,
    the embeddings and the logits whole on each).
    """
    seq = seq_len or cfg.max_seq_len
    tokens, d, vocab, n_layers = micro_batch * seq, cfg.d_model, cfg.vocab_size, cfg.n_layers
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    n_params = model.num_params()
    n_block = sum(p.numel() for p in model.transformer.blocks[0].parameters())
    n_root = n_params - n_layers * n_block  # embeddings, final norm, untied head
    if tp > 1:  # from here on, what this rank's tensor-parallel share holds
        n_block = block_parameters_per_rank(cfg, tp)
        n_params = n_root + n_layers * n_block
    largest = max(p.numel() for p in model.parameters())
    sharded = world_size > 1 or tp > 1  # tensor parallelism always runs under FSDP2 (mptlike.parallel.parallelize)
    world = world_size

    # The compute dtype c, in which every activation (the residual stream included) is kept. Sharded:
    # FSDP2 gathers parameters in param_dtype and there is no autocast. One device: autocast computes
    # in bf16 over fp32 parameters (the model casts the embedding's output to bf16) and saves a bf16
    # copy of every weight it multiplies.
    autocast = not sharded and precision.name == "bf16"
    if sharded:
        c = precision.param_dtype.itemsize if precision.param_dtype is not None else FP32
        reduce_bytes = precision.reduce_dtype.itemsize if precision.reduce_dtype is not None else c
    else:
        c = 2 if autocast else FP32
    attn = _attention_class(cfg, device)
    # sdpa's causal ALiBi mask is built once per forward and shared (and saved) by every layer.
    shared_bias = cfg.n_heads / tp * seq * seq * c if attn == "sdpa" and cfg.alibi else 0.0

    def checkpointed(i: int) -> bool:
        return parallel.ac_mode == "full" or (parallel.ac_mode == "every_k" and i % parallel.ac_every == 0)

    full = _block_activation_bytes(cfg, micro_batch, seq, c, attn, tp)
    kept_input = tokens * d * c / tp  # all a checkpointed block keeps: its input (a sequence shard under tp)
    gathered_input = tokens * d * c if tp > 1 else 0.0  # a block input all-gathered over the sequence

    def saved_blocks(n: int) -> float:
        return shared_bias + sum(kept_input if checkpointed(i) else full for i in range(n))

    head_saved = tokens * d * c * (1 + 1 / tp) + 2 * tokens * FP32 / tp  # final norm's input and (gathered) output
    logits = tokens * vocab * c
    loss_fwd, loss_bwd = _loss_scratch(tokens, vocab, c)
    if cfg.logit_scale is not None:
        loss_fwd += logits  # the unscaled logits, until the scaled copy exists
    ffn = cfg.ffn_hidden_size
    kv = cfg.kv_n_heads * cfg.head_dim
    # Inside a block's backward: the residual stream's gradient and the gradient of the widest
    # activation (the MLP's hidden one, or the fused q/k/v), next to everything the block saved.
    grad_flow = tokens * c * (d / tp + max(ffn / tp, (d + 2 * kv) / tp)) + gathered_input
    if checkpointed(n_layers - 1):
        # Running, a checkpointed block saves nothing but holds its input, the residual after
        # attention and, for a moment, the MLP's hidden activation before and after the GELU.
        last_forward = saved_blocks(n_layers) + tokens * c * (2 * ffn + 2 * d) / tp + gathered_input
    else:
        last_forward = saved_blocks(n_layers - 1) + full

    # Persistent, per rank.
    shard = n_params / world
    params = shard * FP32
    grads = shard * FP32
    opt_state, opt_scratch = _optimizer_bytes(optimizer, optimizer_impl, device, shard, largest / world)
    # Gradients from earlier micro-batches: sharded, unless accumulation skips the reduce-scatter
    # until the last micro-batch (parallel.accumulate_unsharded), which keeps a full fp32 gradient.
    unsharded_between = sharded and parallel.accumulate_unsharded and accumulation_steps > 1
    grads_between = 0.0
    if accumulation_steps > 1:
        grads_between = n_params * FP32 if unsharded_between else grads

    # Transient parameter and gradient copies. FSDP2 (CUDA): the block in use, the next block's
    # all-gather in flight and the previous one's output held by its stream; in backward also the
    # block's unsharded gradients and the reduce-scatter inputs of this block and the last one.
    # The root (embeddings, final norm) stays gathered from its forward to the end of backward and
    # so does the last block (reshard_after_forward is off for it). On CPU there are no streams.
    if sharded:
        in_flight = 3 if device == "cuda" else 2
        rs_buffers = 2 if device == "cuda" else 1
        gathered_fwd = c * (n_root + in_flight * n_block)
        gathered_at_loss = c * (n_root + n_block)
        gathered_bwd = c * (n_root + in_flight * n_block)
        unsharded_grads_bwd = c * (n_root + n_block) + reduce_bytes * rs_buffers * n_block
        cast_all = cast_block = cast_root = 0.0
    else:
        gathered_fwd = gathered_at_loss = gathered_bwd = unsharded_grads_bwd = 0.0
        cast_block = n_block * c if autocast else 0.0
        cast_root = vocab * d * c if autocast else 0.0  # the output embedding's copy, for the logits
        cast_all = n_layers * cast_block + cast_root  # autocast's weight cache lives until forward ends

    def cast_saved(n: int) -> float:
        return sum(cast_block for i in range(n) if not checkpointed(i))

    phases: dict[str, Breakdown] = {}
    phases["forward (last block)"] = Breakdown(
        params + gathered_fwd + cast_all, grads_between, opt_state, last_forward)
    phases["forward (loss)"] = Breakdown(
        params + gathered_at_loss + cast_all, grads_between, opt_state,
        saved_blocks(n_layers) + head_saved + logits + loss_fwd)
    phases["backward (loss)"] = Breakdown(
        params + gathered_at_loss + cast_saved(n_layers) + cast_root, grads_between, opt_state,
        saved_blocks(n_layers) + head_saved + logits + loss_bwd)
    for i in reversed(range(n_layers)):
        if sharded:
            done = FP32 * (n_layers - 1 - i) * n_block / world
            block_grads = max(grads_between, done) + unsharded_grads_bwd
        else:
            done = FP32 * (n_root + (n_layers - i) * n_block)
            block_grads = max(grads_between, done)
        # A recomputed block's first norm saves the block's kept input itself: counted once, in `full`.
        phases[f"backward (block {i})"] = Breakdown(
            params + gathered_bwd + cast_saved(i) + cast_block, block_grads, opt_state,
            saved_blocks(i) + full + grad_flow)
    phases["optimizer step"] = Breakdown(params, grads, opt_state + opt_scratch, 0.0)
    peak_phase = max(phases, key=lambda name: phases[name].total)

    facts = {
        "world_size": str(world_size) if tp == 1 else f"{world_size * tp} per copy ({world_size} FSDP2 x {tp} tp)",
        "micro_batch_size": str(micro_batch),
        "seq_len": str(seq),
        "accumulation_steps": str(accumulation_steps),
        "parameters": str(model.num_params()),
        "precision": precision.name + (" (autocast over fp32 weights)" if autocast else ""),
        "sharding": "none (one device)" if not sharded else (
            f"fsdp2 over {world_size} ranks, gradients "
            + ("unsharded until the last micro-batch" if unsharded_between else "reduce-scattered every micro-batch")),
        **({"tensor_parallel": f"{tp} ranks per group, sequence parallel (whole embeddings and logits on each)"}
           if tp > 1 else {}),
        "activation_checkpointing": parallel.ac_mode + (f" (every {parallel.ac_every})"
                                                        if parallel.ac_mode == "every_k" else ""),
        "attention": f"{cfg.attn_impl} (memory modeled as {attn})",
        "optimizer": optimizer,
    }
    return MemoryEstimate(peak_phase, phases[peak_phase], phases, facts)
