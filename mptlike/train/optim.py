"""Optimizers with weight decay decoupled from the learning rate (llm-foundry / Composer semantics).

In torch's AdamW every step multiplies the weights by (1 - lr_t * wd), so the decay strength
moves with the size of the learning rate. Here the weights are multiplied by
(1 - wd * lr_t / lr_0): `wd` is the per-step decay at the peak learning rate and only the
schedule's shape (lr_t / lr_0) scales it, so lr and wd can be tuned independently. MPT's
published runs use weight_decay 0.0, where both definitions agree.

`initial_lr` (lr_0) is stored in every param group; the scheduler keeps it equal to the
configured peak learning rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mptlike.errors import MptlikeError

OPTIMIZERS = ("decoupled_adamw", "decoupled_lionw")
IMPLS = ("auto", "fused", "foreach", "for")
DECAY_PARAMS = ("all", "matrices")


class DecoupledAdamW(torch.optim.AdamW):
    """Adam plus decoupled weight decay, on torch's (fused / foreach) AdamW kernels.

    torch's AdamW computes p *= 1 - lr_t * weight_decay before the Adam update; handing it
    weight_decay / initial_lr for the duration of the step gives exactly
    p *= 1 - weight_decay * lr_t / initial_lr, Composer's DecoupledAdamW, in the same order.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, **kwargs: Any):
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        decoupled = [group["weight_decay"] for group in self.param_groups]
        try:
            for group, wd in zip(self.param_groups, decoupled):
                lr0 = group.get("initial_lr") or group["lr"]
                group["weight_decay"] = wd / lr0 if lr0 else 0.0
            return super().step(closure)
        finally:
            for group, wd in zip(self.param_groups, decoupled):
                group["weight_decay"] = wd


class DecoupledLionW(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) with decoupled weight decay, as llm-foundry's DecoupledLionW.

    p *= 1 - wd * lr_t / lr_0;  p -= lr_t * sign(beta1 * m + (1 - beta1) * g);
    m = beta2 * m + (1 - beta2) * g.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        foreach: bool = True,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach))
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            lr0 = group.get("initial_lr") or lr
            grads = [p.grad for p in params]
            moms = []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                moms.append(state["exp_avg"])
            if group["foreach"]:
                if wd:
                    torch._foreach_mul_(params, 1 - wd * lr / lr0)
                updates = torch._foreach_lerp(moms, grads, 1 - beta1)
                torch._foreach_sign_(updates)
                torch._foreach_add_(params, updates, alpha=-lr)
                torch._foreach_lerp_(moms, grads, 1 - beta2)
            else:
                for p, g, m in zip(params, grads, moms):
                    if wd:
                        p.mul_(1 - wd * lr / lr0)
                    p.add_(m.lerp(g, 1 - beta1).sign_(), alpha=-lr)
                    m.lerp_(g, 1 - beta2)
        return loss


def decay_groups(model: nn.Module, weight_decay: float, decay_params: str = "all") -> list[dict[str, Any]]:
    """Matrices (linear weights, embeddings) in one group, norms and biases in another.

    `all` decays both, as llm-foundry's optimizer builder (every parameter), torchtitan and litgpt do;
    `matrices` leaves norms and biases undecayed, whose scale is meaningful. The groups are the same
    either way, so a checkpoint written under one setting resumes under the other.
    """
    if decay_params not in DECAY_PARAMS:
        raise MptlikeError(f"optim.decay_params={decay_params!r} is unknown: choose one of {', '.join(DECAY_PARAMS)}")
    matrices, others = [], []
    for param in model.parameters():
        if param.requires_grad:
            (matrices if param.ndim >= 2 else others).append(param)
    groups = [{"params": matrices, "weight_decay": weight_decay}]
    if others:
        groups.append({"params": others, "weight_decay": weight_decay if decay_params == "all" else 0.0})
    return groups


def _impl_flags(impl: str, device_type: str) -> dict[str, bool]:
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "foreach"
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decay_params: str = "all",
    impl: str = "auto",
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    check_optimizer_args(name=name, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, impl=impl)
    groups = decay_groups(model, weight_decay, decay_params)
    if name == "decoupled_adamw":
        return DecoupledAdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **_impl_flags(impl, device_type))
    # Lion has no fused kernel in torch: "fused" falls back to foreach.
    return DecoupledLionW(groups, lr=lr, betas=tuple(betas), foreach=impl != "for")


def check_optimizer_args(
    *, name: str, lr: float, betas: Any, eps: float, weight_decay: float, impl: str
) -> None:
    if name not in OPTIMIZERS:
        raise MptlikeError(f"optim.name={name!r} is unknown: choose one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise MptlikeError(f"optim.lr={lr} is invalid: use a positive learning rate such as 6e-4")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise MptlikeError(f"optim.betas={list(betas)} is invalid: give two numbers in [0, 1), e.g. [0.9,0.95]")
    if not eps > 0:
        raise MptlikeError(f"optim.eps={eps} is invalid: use a small positive number such as 1e-8")
    if not 0 <= weight_decay < 1:
        raise MptlikeError(
            f"optim.weight_decay={weight_decay} is invalid: the decoupled decay is a per-step fraction in [0, 1)"
        )
    if impl not in IMPLS:
        raise MptlikeError(f"optim.impl={impl!r} is unknown: choose one of {', '.join(IMPLS)}")
