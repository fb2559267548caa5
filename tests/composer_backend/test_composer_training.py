"""trainer.backend=composer trains exactly like the Lightning path, resumes exactly, and its checkpoints convert.

References are independent of the Composer backend: the Lightning path's metrics.csv and exported
weights (same seed, data order and hyperparameters, fp32, one process), and an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest
import torch
from composer_runs import MAX_STEPS, read_metrics, small_run, train_with_composer

pytest.importorskip("composer")

pytestmark = [pytest.mark.composer, pytest.mark.filterwarnings("ignore::UserWarning")]

REL = 1e-4


def _column(metrics, name, steps):
    return [metrics[s][name] for s in steps]



def assert_same_model_as_lightnings(config, state, lightning_run):
    """A Composer checkpoint's (config, weights) load into MPTForCausalLM and equal the Lightning run's final/."""
    from mptlike.model import MPTForCausalLM

    model = MPTForCausalLM(config)
    model.load_state_dict(state, strict=True)
    reference = MPTForCausalLM.from_pretrained(lightning_run / "final")
    assert config == reference.config
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-4, atol=1e-6, msg=name)

def test_composer_per_step_losses_equal_the_lightning_path(lightning_run, composer_run):
    steps = range(1, MAX_STEPS + 1)
    reference = _column(read_metrics(lightning_run), "train/loss", steps)
    got = _column(read_metrics(composer_run), "train/loss", steps)
    assert got == pytest.approx(reference, rel=REL)
    assert reference[-1] < reference[0] - 1.0  # it learned something, so the comparison means something


def test_composer_learning_rates_and_gradient_norms_equal_the_lightning_path(lightning_run, composer_run):
    steps = range(1, MAX_STEPS + 1)
    reference, got = read_metrics(lightning_run), read_metrics(composer_run)
    # Warmup from 0 over 2 steps, then cosine to alpha_f: the same numbers, not just the same shape.
    assert _column(got, "train/lr", steps) == pytest.approx(_column(reference, "train/lr", steps), rel=1e-12, abs=0)
    norms = _column(reference, "train/grad_norm", steps)
    assert _column(got, "train/grad_norm", steps) == pytest.approx(norms, rel=REL)


def test_composer_validation_loss_equals_the_lightning_evaluation(lightning_run, composer_run):
    reference, got = read_metrics(lightning_run)[MAX_STEPS], read_metrics(composer_run)[MAX_STEPS]
    assert got["val/loss"] == pytest.approx(reference["val/loss"], rel=REL)
    assert got["val/perplexity"] == pytest.approx(reference["val/perplexity"], rel=REL)


def test_composer_checkpoint_resumes_with_the_uninterrupted_losses(corpus, composer_run, tmp_path):
    # As after a crash at step 4: the run folder holds the step-3 checkpoint and Composer's latest link.
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(composer_run / "checkpoints" / "ep0-ba3-rank0.pt", run_dir / "checkpoints")
    os.symlink("ep0-ba3-rank0.pt", run_dir / "checkpoints" / "latest-rank0.pt")

    result = train_with_composer(small_run(corpus, run_dir, "resume=auto"))

    assert (result.steps_run, result.final_step) == (MAX_STEPS - 3, MAX_STEPS)
    later = range(4, MAX_STEPS + 1)
    resumed, uninterrupted = read_metrics(run_dir), read_metrics(composer_run)
    assert sorted(resumed) == list(later)  # nothing before the checkpoint was trained again
    for name in ("train/loss", "train/lr", "train/grad_norm"):
        assert _column(resumed, name, later) == pytest.approx(_column(uninterrupted, name, later), rel=1e-6)


def test_composer_checkpoint_weights_load_into_mpt_for_causal_lm_equal_to_the_lightning_weights(
    lightning_run, composer_run
):
    from mptlike.integrations.composer.checkpoints import read_composer_checkpoint

    config, state = read_composer_checkpoint(composer_run / "checkpoints" / f"ep0-ba{MAX_STEPS}-rank0.pt")
    assert_same_model_as_lightnings(config, state, lightning_run)


def test_mptlike_convert_writes_a_transformers_model_from_a_composer_checkpoint(lightning_run, composer_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from mptlike.cli.convert import main
    from mptlike.model import MPTForCausalLM

    checkpoint = composer_run / "checkpoints" / f"ep0-ba{MAX_STEPS}-rank0.pt"
    assert main(["to-hf", str(checkpoint), str(tmp_path / "hf")]) == 0

    hf_model = transformers.MptForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference = MPTForCausalLM.from_pretrained(lightning_run / "final").eval()
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_mptlike_train_trainer_composer_selects_the_composer_backend(corpus, tmp_path):
    from mptlike.train.cli import main

    run_dir = tmp_path / "run"
    overrides = small_run(corpus, run_dir, "trainer.max_steps=2", "checkpoint.every_n_steps=0",
                          trainer="trainer=composer")
    assert main(overrides) == 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "ep0-ba2-rank0.pt").is_file()
    assert os.path.realpath(checkpoints / "latest-rank0.pt") == str((checkpoints / "ep0-ba2-rank0.pt").resolve())
    assert sorted(read_metrics(run_dir)) == [1, 2]


def test_init_from_starts_the_composer_run_from_those_weights(corpus, lightning_run, tmp_path):
    from mptlike.integrations.composer.checkpoints import read_composer_checkpoint
    from mptlike.model import MPTForCausalLM

    run_dir = tmp_path / "run"
    # One step at warmup step 0, where the learning rate is 0: the saved weights are the initial ones.
    overrides = small_run(corpus, run_dir, "trainer.max_steps=1", f"init_from={lightning_run / 'final'}",
                          "eval.at_end=false", "checkpoint.export_final=false")
    assert train_with_composer(overrides).final_step == 1
    _, state = read_composer_checkpoint(run_dir / "checkpoints")
    for name, tensor in MPTForCausalLM.from_pretrained(lightning_run / "final").state_dict().items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.precision=bf16", "Composer trains on CPU in fp32 only"),
        ("trainer.devices=2", "need a launcher: run `torchrun --nproc_per_node=2"),
        ("guard.nonfinite=rollback", "cannot reload a checkpoint in the middle of fit(); use guard.nonfinite=skip"),
    ],
)
def test_unsupported_settings_fail_with_one_sentence_before_anything_is_written(corpus, tmp_path, override, message):
    from mptlike.errors import MptlikeError

    run_dir = tmp_path / "run"
    with pytest.raises(MptlikeError, match=re.escape(message)) as info:
        train_with_composer(small_run(corpus, run_dir, override))
    assert "\n" not in str(info.value)
    assert not run_dir.exists()


def test_wandb_offline_run_records_the_training_and_validation_metrics(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    overrides = small_run(corpus, run_dir, "trainer.max_steps=2", "checkpoint.every_n_steps=0",
                          "checkpoint.save_final=false", "logger=wandb", "logger.mode=offline")
    assert train_with_composer(overrides).final_step == 2
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = _wandb_records(next(runs[0].glob("run-*.wandb")))
    for name in (b"train/loss", b"train/lr", b"train/tokens_per_sec", b"val/loss"):
        assert name in records, name


def _wandb_records(path, timeout=15.0):
    # wandb's service process can still be writing the file when run.finish() has returned.
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        if b"train/loss" in data or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def test_two_process_fsdp2_run_equals_the_single_process_lightning_run(lightning_run, composer_two_process_run):
    """torchrun, 2 CPU processes: Composer shards with FSDP2 (gloo); losses and gradient norms are unchanged."""
    steps = range(1, MAX_STEPS + 1)
    reference, got = read_metrics(lightning_run), read_metrics(composer_two_process_run)
    for name in ("train/loss", "train/grad_norm"):
        assert _column(got, name, steps) == pytest.approx(_column(reference, name, steps), rel=REL), name
    sharded = composer_two_process_run / "checkpoints" / f"ep0-ba{MAX_STEPS}"
    assert (sharded / ".metadata").is_file()  # world > 1 saves sharded (torch.distributed.checkpoint) folders


def test_a_sharded_composer_checkpoint_reads_in_one_process_as_the_lightning_weights(
    lightning_run, composer_two_process_run
):
    from mptlike.integrations.composer.checkpoints import read_composer_checkpoint

    config, state = read_composer_checkpoint(composer_two_process_run / "checkpoints")  # latest: ep0-ba6/
    assert_same_model_as_lightnings(config, state, lightning_run)
