"""Against llm-foundry 0.22 itself: the learning rate of every step and the weight-decay targets.

llm-foundry's own builders are the reference: its scheduler builder for MPT-7B's schedule (cosine with
warmup to alpha_f 0.1, scaled down to 2 warmup steps of 6) run by a plain composer.Trainer, and its
optimizer builder (`decoupled_adamw`, every parameter in one group). Runs only where llm-foundry is
installed next to Composer (`make test-composer`).
"""

from __future__ import annotations

import pytest
import torch
from composer_runs import MAX_STEPS, read_metrics

pytest.importorskip("composer")
pytest.importorskip("llmfoundry")

pytestmark = [pytest.mark.composer, pytest.mark.filterwarnings("ignore")]

PEAK_LR = 3e-3  # the quickstart's optim.lr, which the conftest's runs keep (checked below)
WARMUP = 2  # the conftest's optim.warmup_steps
ALPHA_F = 0.1


def foundry_learning_rates(max_steps: int) -> list[float]:
    """The lr each optimizer step of a composer.Trainer uses under llm-foundry's scheduler builder."""
    from composer import Callback, Trainer
    from composer.models import ComposerModel
    from llmfoundry.utils.builders import build_scheduler

    class Line(ComposerModel):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, batch):
            return (self.weight * batch).sum()

        def loss(self, outputs, batch):
            return outputs

    class RecordLr(Callback):
        def __init__(self):
            self.lrs: list[float] = []

        def before_forward(self, state, logger):  # once per batch here (one micro-batch): the lr its step uses
            self.lrs.append(state.optimizers[0].param_groups[0]["lr"])

    model, record = Line(), RecordLr()
    loader = torch.utils.data.DataLoader(torch.ones(max_steps, 1), batch_size=1)
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=f"{max_steps}ba",
        optimizers=torch.optim.SGD(model.parameters(), lr=PEAK_LR),
        schedulers=build_scheduler("cosine_with_warmup", {"t_warmup": f"{WARMUP}ba", "alpha_f": ALPHA_F}),
        step_schedulers_every_batch=True,
        callbacks=[record],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()
    assert len(record.lrs) == max_steps
    return record.lrs


@pytest.fixture(scope="module")
def foundry_lrs():
    return foundry_learning_rates(MAX_STEPS)


def test_llm_foundrys_first_two_steps_train_at_lr_zero(foundry_lrs):
    # What the lag is: steps 0 and 1 both at the multiplier of step 0, step t at that of t - 1.
    assert foundry_lrs[:3] == [0.0, 0.0, pytest.approx(PEAK_LR / WARMUP)]


def _run_lrs(run_dir) -> list[float]:
    from omegaconf import OmegaConf

    config = OmegaConf.load(run_dir / "config.yaml")
    assert (config.optim.lr, config.optim.warmup_steps, config.optim.alpha_f) == (PEAK_LR, WARMUP, ALPHA_F)
    assert (config.optim.schedule, config.trainer.max_steps) == ("cosine", MAX_STEPS)
    return [read_metrics(run_dir)[step]["train/lr"] for step in range(1, MAX_STEPS + 1)]


def test_the_composer_backend_applies_llm_foundrys_learning_rate_at_every_step(composer_run, foundry_lrs):
    assert _run_lrs(composer_run) == pytest.approx(foundry_lrs, rel=1e-12, abs=0)


def test_the_lightning_path_applies_llm_foundrys_learning_rate_at_every_step(lightning_run, foundry_lrs):
    assert _run_lrs(lightning_run) == pytest.approx(foundry_lrs, rel=1e-12, abs=0)


def _tiny_model(seed: int):
    from mptlike.model import MPTConfig, MPTForCausalLM

    torch.manual_seed(seed)
    cfg = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=64, no_bias=False)
    return MPTForCausalLM(cfg)


def _train_three_steps(model, optimizer, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        tokens = torch.randint(0, 64, (2, 17), generator=gen)
        model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer_name", ["decoupled_adamw", "decoupled_lionw"])
def test_decay_params_all_updates_every_parameter_as_llm_foundrys_optimizer_builder(optimizer_name):
    from llmfoundry.utils.builders import build_optimizer as foundry_build_optimizer

    from mptlike.train.optim import build_optimizer

    hparams = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    theirs = _tiny_model(0)
    foundry_config = {k: v for k, v in hparams.items() if not (optimizer_name == "decoupled_lionw" and k == "eps")}
    reference = _train_three_steps(theirs, foundry_build_optimizer(theirs, optimizer_name, foundry_config))

    def ours_with(decay_params: str) -> dict[str, torch.Tensor]:
        model = _tiny_model(0)
        optimizer = build_optimizer(model, name=optimizer_name, decay_params=decay_params, impl="for", **hparams)
        return _train_three_steps(model, optimizer)

    got = ours_with("all")
    for name, tensor in reference.items():
        mine = got[name]
        if name.endswith("Wqkv.bias"):
            # The key bias adds q . b_k to every score of a row, which softmax cancels: its gradient is zero
            # up to rounding noise, which Adam normalizes into steps of either sign. Compare q's and v's.
            keep = torch.ones_like(tensor, dtype=torch.bool)
            keep[32:64] = False
            mine, tensor = mine[keep], tensor[keep]
        torch.testing.assert_close(mine, tensor, rtol=1e-5, atol=1e-7, msg=name)
    # The other choice really differs, where it should: norms and biases keep their scale.
    matrices = ours_with("matrices")
    norms = [name for name in reference if name.endswith(("norm_1.weight", "norm_f.weight", ".bias"))]
    assert norms and all(not torch.allclose(matrices[name], reference[name]) for name in norms)
