"""Decoupled AdamW / LionW against naive re-implementations of llm-foundry's update rules, and the lr schedules."""

import math

import pytest
import torch

from mptlike.errors import MptlikeError
from mptlike.train.optim import DecoupledAdamW, DecoupledLionW, build_optimizer
from mptlike.train.schedule import LRScheduler, Schedule


def _naive_decoupled_adamw(p, grads, lrs, lr0, betas, eps, wd):
    """Composer's DecoupledAdamW written out per element: decay by wd * lr/lr0, then Adam."""
    p = p.clone().double()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    b1, b2 = betas
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        p = p * (1 - wd * lr / lr0)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = (v.sqrt() / math.sqrt(1 - b2**t)) + eps
        p = p - (lr / (1 - b1**t)) * m / denom
    return p


def _naive_lion(p, grads, lrs, lr0, betas, wd):
    p = p.clone().double()
    m = torch.zeros_like(p)
    b1, b2 = betas
    for g, lr in zip(grads, lrs):
        g = g.double()
        p = p * (1 - wd * lr / lr0)
        p = p - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    return p


def _run(opt_cls, kwargs, p0, grads, lrs, lr0):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], lr=lr0, **kwargs)
    for g, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = g.clone()
        opt.step()
    return p.detach().double()


@pytest.mark.parametrize("impl", [{"foreach": True}, {"foreach": False}])
def test_decoupled_adamw_matches_composer_rule_with_weight_decay_scaled_by_lr_ratio(impl):
    torch.manual_seed(0)
    p0 = torch.randn(5, 7)
    grads = [torch.randn(5, 7) for _ in range(6)]
    lr0, wd, betas, eps = 1e-2, 1e-3, (0.9, 0.95), 1e-8
    lrs = [lr0 * f for f in (0.0, 0.5, 1.0, 0.8, 0.3, 0.1)]
    got = _run(DecoupledAdamW, dict(betas=betas, eps=eps, weight_decay=wd, **impl), p0, grads, lrs, lr0)
    want = _naive_decoupled_adamw(p0, grads, lrs, lr0, betas, eps, wd)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_decoupled_adamw_shrinks_weights_by_wd_times_lr_ratio_not_by_lr():
    # With zero gradients Adam's update is 0, so only the decay acts: p * (1 - wd * lr/lr0).
    p = torch.nn.Parameter(torch.ones(3))
    opt = DecoupledAdamW([p], lr=1e-3, weight_decay=0.1)
    opt.param_groups[0]["lr"] = 5e-4  # half the peak
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))
    assert opt.param_groups[0]["weight_decay"] == 0.1  # the stored value is the decoupled one


@pytest.mark.parametrize("foreach", [True, False])
def test_decoupled_lionw_matches_naive_lion_with_decoupled_decay(foreach):
    torch.manual_seed(1)
    p0 = torch.randn(4, 6)
    grads = [torch.randn(4, 6) for _ in range(5)]
    lr0, wd, betas = 1e-3, 1e-2, (0.9, 0.99)
    lrs = [lr0 * f for f in (1.0, 0.9, 0.7, 0.4, 0.2)]
    got = _run(DecoupledLionW, dict(betas=betas, weight_decay=wd, foreach=foreach), p0, grads, lrs, lr0)
    want = _naive_lion(p0, grads, lrs, lr0, betas, wd)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_decay_params_matrices_skips_norm_weights_and_biases_and_all_decays_every_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))

    def decayed(decay_params):
        opt = build_optimizer(model, name="decoupled_adamw", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              decay_params=decay_params)
        # The same two groups either way, so a checkpoint resumes under the other setting.
        assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
        return {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}

    assert decayed("matrices") == {id(model[0].weight)}
    assert decayed("all") == {id(p) for p in model.parameters()}
    with pytest.raises(MptlikeError, match="optim.decay_params"):
        decayed("norms")


def test_bad_optimizer_values_raise_errors_naming_the_key():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(MptlikeError, match="optim.betas"):
        build_optimizer(model, name="decoupled_adamw", lr=1e-3, betas=(0.9,), eps=1e-8, weight_decay=0.0)
    with pytest.raises(MptlikeError, match="optim.name"):
        build_optimizer(model, name="sgd", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def test_cosine_schedule_warms_up_linearly_then_decays_to_alpha_f():
    s = Schedule("cosine", max_steps=1100, warmup_steps=100, alpha_f=0.1)
    assert s(0) == 0.0
    assert s(50) == pytest.approx(0.5)
    assert s(100) == pytest.approx(1.0)
    assert s(600) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert s(1100) == pytest.approx(0.1)
    assert s(5000) == pytest.approx(0.1)  # stays at the floor past max_steps


def test_linear_and_constant_schedules():
    lin = Schedule("linear", max_steps=10, warmup_steps=0, alpha_f=0.0)
    assert [lin(t) for t in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = Schedule("constant", max_steps=10, warmup_steps=4)
    assert [const(t) for t in (2, 4, 9)] == pytest.approx([0.5, 1.0, 1.0])


def test_scheduler_sets_lr_and_keeps_initial_lr_at_the_peak():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = DecoupledAdamW([p], lr=1.0)
    schedule = Schedule("cosine", max_steps=10, warmup_steps=0, alpha_f=0.1, timing="exact")
    sched = LRScheduler(opt, schedule, peak_lr=2e-3)
    lr = sched.apply(10)
    assert lr == pytest.approx(2e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert opt.param_groups[0]["initial_lr"] == 2e-3


def test_composer_timing_trains_step_t_at_the_multiplier_of_t_minus_1_and_exact_at_t():
    composer = Schedule("cosine", max_steps=10, warmup_steps=4, alpha_f=0.1)
    exact = Schedule("cosine", max_steps=10, warmup_steps=4, alpha_f=0.1, timing="exact")
    assert [composer.for_step(t) for t in range(4)] == pytest.approx([0.0, 0.0, 0.25, 0.5])
    assert [exact.for_step(t) for t in range(4)] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert composer.for_step(10) == exact.for_step(9)
    p = torch.nn.Parameter(torch.zeros(1))
    assert LRScheduler(DecoupledAdamW([p], lr=1.0), composer, peak_lr=1e-3).apply(3) == pytest.approx(5e-4)
    with pytest.raises(MptlikeError, match="optim.lr_timing"):
        Schedule("cosine", max_steps=10, timing="late")


def test_unknown_schedule_is_refused():
    with pytest.raises(MptlikeError, match="optim.schedule"):
        Schedule("step", max_steps=10)
