"""Error paths run as a user runs them (a new process): one line, exit 2, no traceback.

mptlike-train's config errors, mptlike-convert and mptlike-prep have such tests in their own files.
"""

import os
import subprocess
import sys

import pytest
from train_helpers import make_corpus, tiny_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def run(module, *args, cwd, faults=""):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=180, env={**os.environ, "MPTLIKE_FAULTS": faults})


def assert_one_line_error(proc, prog, *words):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0]


@pytest.mark.parametrize("module, prog, make_args, words", [
    ("mptlike.cli.eval", "mptlike-eval", lambda tmp, corpus: [tmp / "nope", "--data", corpus], ["nope"]),
    ("mptlike.cli.generate", "mptlike-generate", lambda tmp, corpus: [tmp / "nope"], ["nope"]),
])
def test_commands_given_a_missing_path_print_one_line_without_a_traceback(tmp_path, corpus, module, prog,
                                                                           make_args, words):
    assert_one_line_error(run(module, *make_args(tmp_path, corpus), cwd=tmp_path), prog, *words)


def test_a_run_stopped_by_the_nan_guard_prints_one_line_without_a_traceback(tmp_path, corpus):
    args = tiny_args(corpus, tmp_path / "run", "eval.every_n_steps=0", "eval.at_end=false",
                     "guard.nonfinite=stop")
    proc = run("mptlike.train", *args, cwd=tmp_path, faults="nan_at_step=2")
    assert_one_line_error(proc, "mptlike-train", "step 2: non-finite loss nan")
