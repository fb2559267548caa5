"""The LightningModule: one `training_step` is one optimizer step over a whole global batch.

Lightning supplies the processes, the device mesh, autocast and the loop; this module does the
rest by hand (manual optimization), because exact resume needs it: each step pulls its
`accumulation_steps` micro-batches from the resumable loader itself (no prefetching that could
run ahead of a checkpoint), runs forward/backward on each with gradient sync only on the last,
clips, and steps optimizer and schedule. Evaluation and checkpoints run between steps.
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
    TrainState,
    load_checkpoint,
    load_pretrained_weights,
    remove_stale_tmp,
    save_checkpoint,
)
from mptlike.train.evaluate import evaluate
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
        self._nonfinite = 0
        self._last_saved = -1

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
        self._train_iter = iter(self._loader)
        if cfg.eval.every_n_steps or cfg.eval.at_end:
            self._val_dataset = self._open_val(seq_len, with_ids)

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
        self._loader.load_state_dict(state.loader)
        self._last_saved = state.step
        log.info("resumed from %s at step %d (saved at world size %d)", path, state.step, state.world_size)

    def _next_micro_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self._train_iter)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---- one optimizer step --------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> None:
        plan = self.plan
        optimizer = self.optimizers()
        lr = self._scheduler.apply(self.step)
        accum = plan.accumulation_steps
        sharded = is_sharded(self.model)
        loss_sum = torch.zeros((), device=self.device)
        for i in range(accum):
            micro = self._next_micro_batch()
            if sharded:
                # Reduce-scatter gradients once per step, after the last micro-batch.
                self.model.set_requires_gradient_sync(i == accum - 1)
            out = self.model(micro["input_ids"], labels=micro["labels"], sequence_id=micro.get("sequence_id"))
            self.manual_backward(out.loss / accum)
            loss_sum += out.loss.detach().float()
        loss = loss_sum / accum
        if plan.world.world_size > 1:
            dist.all_reduce(loss)
            loss /= plan.world.world_size
        grad_norm = self._clip_gradients()
        loss_value, norm_value = loss.item(), grad_norm.item()
        skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        if skipped:
            self._nonfinite += 1
            log.warning("step %d: non-finite loss %s or grad norm %s, optimizer step skipped",
                        self.step + 1, loss_value, norm_value)
            if self._nonfinite >= plan.cfg.trainer.max_nonfinite_steps:
                raise RuntimeError(
                    f"{self._nonfinite} consecutive steps with a non-finite loss: lower optim.lr, raise "
                    f"optim.warmup_steps, or resume from an earlier checkpoint"
                )
        else:
            self._nonfinite = 0
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += plan.tokens_per_step
        self.last = StepResult(self.step, loss_value, lr, norm_value, skipped)
        if self.first_loss is None:
            self.first_loss = loss_value
        self._between_steps()

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
        )
        path = save_checkpoint(self.plan.run_dir, self.model, self._optimizer, state,
                               keep_last=self.plan.cfg.checkpoint.keep_last)
        self._last_saved = self.step
        self.overhead_seconds += time.perf_counter() - start
        log.info("step %d: checkpoint %s", self.step, path)

    def on_train_end(self) -> None:
        cfg = self.plan.cfg
        if self.step > self.plan.start_step:
            if cfg.checkpoint.save_final and self._last_saved != self.step:
                self.save()
            if cfg.eval.at_end:
                self.run_eval()
        if cfg.checkpoint.export_final or cfg.sample.max_new_tokens:
            from mptlike.train.export import export_and_sample

            self.export_dir, self.sample_text = export_and_sample(self.model, self.plan)
