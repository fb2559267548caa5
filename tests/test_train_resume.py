"""Single-process training runs: exact resume, checkpoint rotation, the metrics file, the saved config."""

import pytest
import yaml
from train_helpers import losses, make_corpus, tiny_args

from mptlike.model import MPTForCausalLM
from mptlike.train.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    """Six uninterrupted steps with checkpoints after steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    assert main(tiny_args(corpus, run_dir)) == 0
    return run_dir


def test_uninterrupted_run_logs_every_step_and_saves_checkpoints_and_config(full_run):
    assert sorted(losses(full_run)) == [1, 2, 3, 4, 5, 6]
    assert sorted(losses(full_run, "val/loss")) == [3, 6]
    ckpts = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000006"]
    for name in ckpts:
        assert (full_run / "checkpoints" / name / "COMPLETE").is_file()
    saved = yaml.safe_load((full_run / "config.yaml").read_text())
    assert saved["model"]["d_model"] == 64 and saved["trainer"]["max_steps"] == 6
    assert saved["run_dir"] == str(full_run)
    header = (full_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "step"
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/samples_per_sec",
                 "train/tflops_per_device", "train/memory_gb", "val/loss", "val/perplexity"):
        assert name in header


def test_resume_from_a_checkpoint_continues_with_bitwise_identical_losses(corpus, full_run, tmp_path):
    run_dir = tmp_path / "resumed"
    ckpt = full_run / "checkpoints" / "step-0000003"
    assert main(tiny_args(corpus, run_dir, f"resume={ckpt}")) == 0
    want, got = losses(full_run), losses(run_dir)
    assert sorted(got) == [4, 5, 6]
    # Same weights, optimizer moments, schedule step and data position, same kernels: fp32 on
    # CPU reproduces every bit.
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]
    assert losses(run_dir, "val/loss")[6] == losses(full_run, "val/loss")[6]


def test_resume_auto_skips_an_incomplete_newest_checkpoint_and_truncates_stale_metrics(
    corpus, full_run, tmp_path, caplog
):
    import shutil

    run_dir = tmp_path / "auto"
    shutil.copytree(full_run, run_dir)
    # A crash during the step-6 save: the folder exists but never got its COMPLETE marker.
    (run_dir / "checkpoints" / "step-0000006" / "COMPLETE").unlink()
    with caplog.at_level("WARNING"):
        assert main(tiny_args(corpus, run_dir, "resume=auto")) == 0
    assert "skipping incomplete checkpoint" in caplog.text
    want, got = losses(full_run), losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # rows 4-6 were rewritten by the resumed run
    assert got == want
    assert (run_dir / "checkpoints" / "step-0000006" / "COMPLETE").is_file()


def test_resume_never_refuses_a_run_dir_with_checkpoints(capsys, corpus, full_run):
    assert main(tiny_args(corpus, full_run, "resume=never")) == 2
    assert "checkpoint.overwrite=true" in capsys.readouterr().err


def test_keep_last_keeps_only_the_newest_checkpoints_and_final_export_loads(corpus, tmp_path):
    run_dir = tmp_path / "rotate"
    args = tiny_args(
        corpus, run_dir, "trainer.max_steps=4", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2",
        "checkpoint.export_final=true", "eval.every_n_steps=0", "sample.max_new_tokens=8",
    )
    assert main(args) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]
    model = MPTForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.d_model == 64 and model.config.vocab_size == 320


def test_run_that_already_reached_max_steps_trains_nothing(capsys, corpus, full_run):
    before = (full_run / "metrics.csv").read_text()
    assert main(tiny_args(corpus, full_run)) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert (full_run / "metrics.csv").read_text() == before


def test_init_from_starts_a_fresh_run_from_saved_weights(corpus, tmp_path):
    import torch

    from mptlike.data import TokenDataset, build_loader
    from mptlike.model import MPTConfig

    torch.manual_seed(123)
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=320)
    saved = MPTForCausalLM(cfg)
    saved.save_pretrained(tmp_path / "init")
    run_dir = tmp_path / "run"
    args = tiny_args(corpus, run_dir, f"init_from={tmp_path / 'init'}", "trainer.max_steps=1", "eval.every_n_steps=0",
                     "eval.at_end=false", "checkpoint.save_final=false")
    assert main(args) == 0
    # Reference: the saved model's mean loss over the first global batch (seed 17, one rank).
    loader = build_loader(TokenDataset(corpus, "train", seq_len=32), global_batch_size=8, micro_batch_size=2,
                          rank=0, world_size=1, seed=17)
    batches = iter(loader)
    with torch.no_grad():
        micro = [saved(b["input_ids"], labels=b["labels"]).loss for b in (next(batches) for _ in range(4))]
    assert losses(run_dir)[1] == pytest.approx(torch.stack(micro).mean().item(), rel=1e-6)


def test_init_from_with_another_model_shape_exits_2(capsys, corpus, tmp_path):
    from mptlike.model import MPTConfig

    MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=320)).save_pretrained(
        tmp_path / "init"
    )
    run_dir = tmp_path / "run"
    assert main(tiny_args(corpus, run_dir, f"init_from={tmp_path / 'init'}")) == 2
    err = capsys.readouterr().err
    assert "model.d_model=64 vs 32" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()
