"""Shared by the Composer tests: a tiny corpus and one six-step run per backend, each trained once.

The tests here run only where MosaicML Composer is installed (`make test-composer`); each module
skips itself elsewhere. Nothing in this file imports Composer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from composer_runs import MAX_STEPS, WORDS, composer_process, small_run, train_with_composer


def pytest_configure(config):
    config.addinivalue_line("markers", "composer: needs MosaicML Composer (its own environment: make composer-env)")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """About 30k byte tokens of jsonl documents, prepared with the data API (bytes tokenizer, 20% val)."""
    from mptlike.data import prepare

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = root / "docs.jsonl"
    with docs.open("w") as f:
        for i in range(48):
            text = " ".join(rng.choice(WORDS) for _ in range(120))
            f.write(json.dumps({"text": f"{text} {i}"}) + "\n")
    out = root / "data"
    prepare([str(docs)], out, "bytes", val_fraction=0.2, progress=False)
    return out


@pytest.fixture(scope="session")
def lightning_run(corpus, tmp_path_factory) -> Path:
    """The reference: the default (Lightning) path of mptlike-train, six steps."""
    from mptlike.train.cli import main

    run_dir = tmp_path_factory.mktemp("lightning") / "run"
    assert main(small_run(corpus, run_dir)) == 0
    return run_dir


@pytest.fixture(scope="session")
def composer_run(corpus, tmp_path_factory) -> Path:
    """The same run on the Composer backend; checkpoints at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("composer") / "run"
    result = train_with_composer(small_run(corpus, run_dir))
    assert result.final_step == MAX_STEPS
    return run_dir


@pytest.fixture(scope="session")
def composer_two_process_run(corpus, tmp_path_factory) -> Path:
    """The same run under torchrun, 2 CPU processes: Composer shards with FSDP2 (gloo)."""
    run_dir = tmp_path_factory.mktemp("composer2") / "run"
    done = composer_process(small_run(corpus, run_dir), nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir
