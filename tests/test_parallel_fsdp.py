"""FSDP2 on 2 CPU processes (gloo) against one process: same losses, checkpoints that either world size resumes."""

import json

import pytest
from train_helpers import assert_close_per_step as assert_close
from train_helpers import losses, make_corpus, torchrun
from train_helpers import sharded_args as tiny_args

from mptlike.train.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    assert main(tiny_args(corpus, run_dir)) == 0
    return run_dir


@pytest.fixture(scope="module")
def two_processes(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two") / "run"
    torchrun(tiny_args(corpus, run_dir))
    return run_dir


@pytest.mark.slow
def test_two_process_fsdp2_gives_the_same_losses_as_one_process(one_process, two_processes):
    assert_close(losses(two_processes), losses(one_process))
    assert_close(losses(two_processes, "val/loss"), losses(one_process, "val/loss"))


@pytest.mark.slow
def test_two_process_fsdp2_gradients_are_the_mean_over_ranks(one_process, two_processes):
    # Adam hides a gradient scale in the losses; the pre-clipping norm shows it.
    assert_close(losses(two_processes, "train/grad_norm"), losses(one_process, "train/grad_norm"))


@pytest.mark.slow
def test_two_process_checkpoint_is_sharded_into_one_file_per_rank(two_processes):
    ckpt = two_processes / "checkpoints" / "step-0000003"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert json.loads((ckpt / "train_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_one_process_resumes_a_two_process_checkpoint(corpus, one_process, two_processes, tmp_path):
    run_dir = tmp_path / "resumed-on-1"
    assert main(tiny_args(corpus, run_dir, f"resume={two_processes / 'checkpoints' / 'step-0000003'}")) == 0
    want = {s: v for s, v in losses(one_process).items() if s > 3}
    assert_close(losses(run_dir), want)


@pytest.mark.slow
def test_two_processes_resume_a_one_process_checkpoint(corpus, one_process, tmp_path):
    run_dir = tmp_path / "resumed-on-2"
    torchrun(tiny_args(corpus, run_dir, f"resume={one_process / 'checkpoints' / 'step-0000003'}"))
    want = {s: v for s, v in losses(one_process).items() if s > 3}
    assert_close(losses(run_dir), want)
