"""What a run prints while it trains when stderr is not a terminal (a SLURM log, CI)."""

import logging
import re

from train_helpers import make_corpus, tiny_args

from mptlike.train.cli import main


def test_a_non_tty_run_prints_a_step_line_every_n_steps_and_at_the_last_with_grad_norm_and_memory(tmp_path,
                                                                                                   caplog):
    corpus = make_corpus(tmp_path / "corpus")
    with caplog.at_level(logging.INFO, logger="mptlike.train"):
        assert main(tiny_args(corpus, tmp_path / "run", "trainer.max_steps=5", "trainer.log_every_n_steps=2",
                              "eval.every_n_steps=0", "eval.at_end=false", "checkpoint.every_n_steps=0")) == 0
    messages = [r.getMessage() for r in caplog.records]
    lines = [m for m in messages if m.startswith("step ") and "| loss" in m]
    assert [int(re.match(r"step (\d+)/5", line).group(1)) for line in lines] == [2, 4, 5]
    for line in lines:
        assert re.search(r"\| grad norm \d+\.\d+ \|", line) and re.search(r"\| memory \d+\.\d+ GB$", line), line
