"""The LightningModule: one `training_step` is one optimizer step over a whole global batch.

Lightning supplies the processes, the device mesh, autocast and the loop; this module does the
rest by hand (manual optimization), because exact resume needs it: each step pulls its
`accumulation_steps` micro-batches from the resumable loader itself (no prefetching that could
run ahead of a checkpoint), runs forward/backward on each with gradient sync only on the last,
clips, and steps optimizer and schedule. Evaluation and checkpoints run between steps.
A NaN/inf loss or gradient norm is handled before the optimizer step by the policy in
`mptlike.train.guard` (stop, skip, or roll back to the last checkpoint).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from mptlike.model import MPTForCausalLM
from mptlike.parallel import is_sharded, materialize, parallelize, resolve_init_mode
from mptlike.train.checkpoint import (
    PendingCheckpoint,
    TrainState,
    complete_checkpoints,
    finish_checkpoint,
    load_checkpoint,
    load_pretrained_weights,
    remove_stale_tmp,
    start_checkpoint,
)
from mptlike.train.evaluate import evaluate
from mptlike.train.guard import (
    GUARD_EVENTS,
    SAMPLES_LOG,
    NonFiniteError,
    append_jsonl,
    batch_sample_ids,
    describe_ids,
    stop_message,
    truncate_jsonl,
)
from mptlike.train.optim import build_optimizer
from mptlike.train.plan import RunPlan
from mptlike.train.schedule import LRScheduler

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int  # optimizer steps completed, counting this one
    loss: float  # mean over the global batch
    lr: float
    grad_norm: float  # before clipping
    skipped: bool  # non-finite loss or gradient: the optimizer step was not taken


class MPTTrainingModule(pl.LightningModule):
    def __init__(self, plan: RunPlan) -> None:
        super().__init__()
        self.plan = plan
        self.automatic_optimization = False
        self.model: MPTForCausalLM | None = None
        self.step = plan.start_step
        self.tokens_seen = 0
        self.last: StepResult | None = None
        self.first_loss: float | None = None
        self.last_val: dict[str, float] = {}
        self.sample_text: str | None = None
        self.export_dir: Path | None = None
        # Seconds spent on evaluation and checkpoints, which throughput must not count as training.
        self.overhead_seconds = 0.0
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: LRScheduler | None = None
        self._train_iter = None
        self._loader = None
        self._val_dataset = None
        self._nonfinite_events = 0  # guard events so far (checkpointed)
        self._skip_positions: set[int] = set()  # stream positions of global batches to pass over
        self._last_saved = -1
        self._pending: PendingCheckpoint | None = None  # an asynchronous save not yet marked COMPLETE
        self._async_group: Any = False  # False: synchronous saves; else the process group async saves use

    # ---- model and optimizer -------------------------------------------------------------

    def _build_meta(self) -> MPTForCausalLM:
        with torch.device("meta"):
            return MPTForCausalLM(self.plan.model_config)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        plan = self.plan
        model = self._build_meta()
        mesh = self.device_mesh["data_parallel"] if plan.world.world_size > 1 else None
        parallelize(
            model,
            plan.parallel,
            mesh=mesh,
            param_dtype=plan.precision.param_dtype,
            reduce_dtype=plan.precision.reduce_dtype,
        )
        device = self.trainer.strategy.root_device
        mode = resolve_init_mode(plan.cfg.parallel.init, device, plan.world.world_size)
        materialize(model, device, seed=plan.cfg.seed, init=mode, build_full=self._build_meta)
        if plan.init_from is not None and plan.resume_from is None:
            load_pretrained_weights(model, plan.init_from)
            log.info("initialized the weights from %s", plan.init_from)
        self.model = model

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.plan.cfg.optim
        self._optimizer = build_optimizer(
            self.model,
            name=o.name,
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            impl=o.impl,
            device_type=self.trainer.strategy.root_device.type,
        )
        self._scheduler = LRScheduler(self._optimizer, self.plan.schedule, o.lr)
        return self._optimizer

    # ---- data and resume -----------------------------------------------------------------

    def on_train_start(self) -> None:
        from mptlike.data import TokenDataset, build_loader

        plan, cfg = self.plan, self.plan.cfg
        rank, world = self.global_rank, self.trainer.world_size
        seq_len = plan.model_config.max_seq_len
        with_ids = plan.model_config.attn_uses_sequence_id
        train = TokenDataset(plan.data.path, "train", seq_len=seq_len, with_sequence_id=with_ids)
        self._loader = build_loader(
            train,
            global_batch_size=cfg.trainer.global_batch_size,
            micro_batch_size=cfg.trainer.micro_batch_size,
            rank=rank,
            world_size=world,
            seed=cfg.seed,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        if rank == 0:
            remove_stale_tmp(plan.run_dir)
        if plan.resume_from is not None:
            self._resume(plan.resume_from)
        else:
            # Dropout differs per rank on purpose; the weights were seeded separately.
            torch.manual_seed(cfg.seed + 1 + rank)
        if rank == 0:
            # Rows a killed run wrote after its last checkpoint describe steps that run again.
            truncate_jsonl(plan.run_dir / SAMPLES_LOG, self.step)
            truncate_jsonl(plan.run_dir / GUARD_EVENTS, self.step)
        self._train_iter = iter(self._loader)
        if cfg.eval.every_n_steps or cfg.eval.at_end:
            self._val_dataset = self._open_val(seq_len, with_ids)
        if cfg.checkpoint.async_save:
            self._async_group = None
            if dist.is_available() and dist.is_initialized():
                # The background writer runs its own collectives (on CPU): a group of its own keeps
                # them from interleaving with training's on the default group.
                self._async_group = dist.new_group(backend="gloo")

    def _open_val(self, seq_len: int, with_ids: bool):
        from mptlike.data import Manifest, TokenDataset

        manifest = Manifest.load(self.plan.data.path)
        if manifest.num_tokens.get("val", 0) <= seq_len:
            log.warning("%s has no usable val split: validation is skipped", self.plan.data.path)
            return None
        return TokenDataset(self.plan.data.path, "val", seq_len=seq_len, with_sequence_id=with_ids)

    def _resume(self, path: Path) -> None:
        # Hyperparameters come from the config, moments from the checkpoint.
        hparams = [{k: g[k] for k in ("betas", "eps", "weight_decay") if k in g} for g in self._optimizer.param_groups]
        state = load_checkpoint(path, self.model, self._optimizer)
        for group, values in zip(self._optimizer.param_groups, hparams):
            group.update(values)
        self.step = state.step
        self.tokens_seen = state.tokens_seen
        self._nonfinite_events = state.nonfinite_events
        self._skip_positions = set(state.skip_positions)
        self._loader.load_state_dict(state.loader)
        self._last_saved = state.step
        log.info("resumed from %s at step %d (saved at world size %d)", path, state.step, state.world_size)

    def _next_micro_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self._train_iter)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---- one optimizer step --------------------------------------------------------------

    def _pass_over_skipped_batches(self) -> int:
        """Draw and drop global batches a rollback marked; returns the position this step reads."""
        while self._loader.samples_consumed in self._skip_positions:
            for _ in range(self.plan.accumulation_steps):
                next(self._train_iter)
        return self._loader.samples_consumed

    def _batch_ids(self, position: int) -> list[int]:
        loader = self._loader
        return batch_sample_ids(position, loader.global_batch_size, loader.num_samples, loader.seed)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        plan = self.plan
        optimizer = self.optimizers()
        position = self._pass_over_skipped_batches()
        lr = self._scheduler.apply(self.step)
        accum = plan.accumulation_steps
        sharded = is_sharded(self.model)
        inject = plan.cfg.guard.inject_nan_at_step
        poisoned = inject > 0 and position == (inject - 1) * plan.cfg.trainer.global_batch_size
        loss_sum = torch.zeros((), device=self.device)
        for i in range(accum):
            micro = self._next_micro_batch()
            if sharded:
                # Reduce-scatter gradients once per step, after the last micro-batch.
                self.model.set_requires_gradient_sync(i == accum - 1)
            out = self.model(micro["input_ids"], labels=micro["labels"], sequence_id=micro.get("sequence_id"))
            micro_loss = out.loss * float("nan") if poisoned else out.loss
            self.manual_backward(micro_loss / accum)
            loss_sum += micro_loss.detach().float()
        loss = loss_sum / accum
        if plan.world.world_size > 1:
            dist.all_reduce(loss)
            loss /= plan.world.world_size
        grad_norm = self._clip_gradients()
        # The loss is all-reduced and the norm global, so every rank reads the same two numbers.
        loss_value, norm_value = loss.item(), grad_norm.item()
        skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        action = self._on_nonfinite(position, loss_value, norm_value) if skipped else "step"
        if action == "step":
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if action == "rollback":
            self._rollback(position)
            return
        self.step += 1
        self.tokens_seen += plan.tokens_per_step
        self.last = StepResult(self.step, loss_value, lr, norm_value, skipped)
        if self.first_loss is None:
            self.first_loss = loss_value
        if plan.cfg.debug.log_sample_ids and self.global_rank == 0:
            append_jsonl(plan.run_dir / SAMPLES_LOG, {"step": self.step, "samples": self._batch_ids(position)})
        if self.step >= plan.cfg.trainer.max_steps:
            self.trainer.should_stop = True  # a rollback replays steps, so the loop's batch count is only a bound
        self._between_steps()

    def _on_nonfinite(self, position: int, loss: float, grad_norm: float) -> str:
        """Apply guard.nonfinite: raise NonFiniteError, or return "skip" or "rollback"."""
        guard = self.plan.cfg.guard
        step = self.step + 1
        ids = self._batch_ids(position)
        policy = guard.nonfinite
        if policy != "stop" and self._nonfinite_events >= guard.max_skips:
            reason = f"guard.max_skips={guard.max_skips} events already handled by guard.nonfinite={policy}"
            policy = "stop"
        else:
            reason = "guard.nonfinite=stop"
        event = {"step": step, "loss": repr(loss), "grad_norm": repr(grad_norm), "action": policy,
                 "stream_position": position, "samples": ids}
        if self.global_rank == 0:
            append_jsonl(self.plan.run_dir / GUARD_EVENTS, event)
        self.log_metrics({"guard/nonfinite_step": 1.0}, step)
        if policy == "stop":
            self.finish_pending_save()  # saved before this step: its weights are finite
            raise NonFiniteError(stop_message(step, loss, grad_norm, ids, reason))
        self._nonfinite_events += 1
        log.warning("step %d: non-finite loss %s or gradient norm %s on samples %s: %s (event %d of at most %d)",
                    step, loss, grad_norm, describe_ids(ids),
                    "update skipped" if policy == "skip" else "rolling back to the last checkpoint",
                    self._nonfinite_events, guard.max_skips)
        return policy

    def _rollback(self, position: int) -> None:
        """Reload the newest complete checkpoint; the replay passes over the batch at `position`."""
        self.finish_pending_save()
        found = complete_checkpoints(self.plan.run_dir)
        if not found:
            ids = self._batch_ids(position)
            raise NonFiniteError(stop_message(self.step + 1, math.nan, math.nan, ids,
                                              "guard.nonfinite=rollback found no complete checkpoint to roll back to"))
        skip, events = self._skip_positions | {position}, self._nonfinite_events
        self._resume(found[-1][1])
        # The checkpoint predates this event: keep the newer bookkeeping.
        self._skip_positions = skip | self._skip_positions
        self._nonfinite_events = max(events, self._nonfinite_events)
        self._train_iter = iter(self._loader)
        self.last = None  # no step was taken: the callbacks report nothing
        if self.global_rank == 0:
            truncate_jsonl(self.plan.run_dir / SAMPLES_LOG, self.step)
            for logger in self.trainer.loggers:
                if hasattr(logger, "truncate"):
                    logger.truncate(self.step)

    def _clip_gradients(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.plan.cfg.optim.grad_clip
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # Under FSDP2 the norm is a DTensor holding partial sums: full_tensor() all-reduces it.
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _between_steps(self) -> None:
        cfg = self.plan.cfg
        if self.step >= cfg.trainer.max_steps:
            return  # the end-of-training hook evaluates and saves
        if cfg.eval.every_n_steps and self.step % cfg.eval.every_n_steps == 0:
            self.run_eval()
        if cfg.checkpoint.every_n_steps and self.step % cfg.checkpoint.every_n_steps == 0:
            self.save()

    # ---- evaluation, checkpoints, metrics ------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def run_eval(self) -> dict[str, float]:
        if self._val_dataset is None:
            return {}
        start = time.perf_counter()
        metrics = evaluate(
            self.model,
            self._val_dataset,
            max_samples=self.plan.cfg.eval.max_samples,
            micro_batch_size=self.plan.cfg.trainer.micro_batch_size,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
            device=self.device,
        )
        if metrics:
            self.last_val = metrics
            self.log_metrics(metrics, self.step)
            log.info("step %d: val/loss %.4f, val/perplexity %.2f", self.step, metrics["val/loss"],
                     metrics["val/perplexity"])
        self.overhead_seconds += time.perf_counter() - start
        return metrics

    def save(self) -> None:
        start = time.perf_counter()
        state = TrainState(
            step=self.step,
            loader=self._loader.state_dict(),
            world_size=self.trainer.world_size,
            tokens_seen=self.tokens_seen,
            nonfinite_events=self._nonfinite_events,
            skip_positions=sorted(self._skip_positions),
        )
        self.finish_pending_save()
        ckpt = self.plan.cfg.checkpoint
        pending = start_checkpoint(self.plan.run_dir, self.model, self._optimizer, state, keep_last=ckpt.keep_last,
                                   test_delay_s=ckpt.test_delay_s, async_group=self._async_group)
        self._last_saved = self.step
        if self._async_group is False:
            path = finish_checkpoint(pending)
            log.info("step %d: checkpoint %s", self.step, path)
        else:
            self._pending = pending
        self.overhead_seconds += time.perf_counter() - start

    def finish_pending_save(self) -> None:
        """Collective: wait for an asynchronous save, then mark it COMPLETE."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        path = finish_checkpoint(pending)
        log.info("step %d: checkpoint %s (written in the background)", pending.state.step, path)

    def on_train_end(self) -> None:
        cfg = self.plan.cfg
        if self.step > self.plan.start_step:
            if cfg.checkpoint.save_final and self._last_saved != self.step:
                self.save()
            self.finish_pending_save()
            if cfg.eval.at_end:
                self.run_eval()
        if cfg.checkpoint.export_final or cfg.sample.max_new_tokens:
            from mptlike.train.export import export_and_sample

            self.export_dir, self.sample_text = export_and_sample(self.model, self.plan)
