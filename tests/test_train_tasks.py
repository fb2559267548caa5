"""lm-eval tasks during training (eval.tasks): logged at the scheduled steps, equal to mptlike-eval on the
checkpoints of those steps, the same on 2 FSDP2 ranks as on one process, refused in one line when they
cannot run, and free when unset (lm-eval is not even imported).

The tasks are the offline ones of tests/data/lm_eval_tasks: multiple choice (loglikelihood), greedy
generation scored by exact match and by the generated text itself, and a perplexity task (rolling
loglikelihoods). Seven examples each: with the tiny runs' micro-batch of 2, two ranks get an odd
number of generation and rolling batches, so one rank pads with a pass of its own.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from train_helpers import make_corpus, read_metrics, tiny_args, torchrun

from mptlike.train.cli import main

pytest.importorskip("lm_eval")

from mptlike.cli.eval import main as mptlike_eval  # noqa: E402

TESTS = Path(__file__).resolve().parent
TASKS = TESTS / "data" / "lm_eval_tasks"
TASK_FILES = [TASKS / name for name in ("tiny_mc.yaml", "tiny_gen.yaml", "tiny_gen_text.yaml", "tiny_ppl.yaml")]
LIMIT = 7
TASK_ARGS = (f"eval.tasks=[{','.join(map(str, TASK_FILES))}]", "eval.tasks_every_n_steps=3",
             f"eval.tasks_limit={LIMIT}")
METRICS = {
    "eval/tiny_mc/acc", "eval/tiny_mc/acc_norm", "eval/tiny_gen/exact_match", "eval/tiny_gen_text/chars",
    "eval/tiny_gen_text/text_crc", "eval/tiny_ppl/word_perplexity", "eval/tiny_ppl/byte_perplexity",
    "eval/tiny_ppl/bits_per_byte",
}
# Counts and whole strings: equal on any world size, as the models are equal within 1e-4.
EXACT = {"eval/tiny_mc/acc", "eval/tiny_mc/acc_norm", "eval/tiny_gen/exact_match", "eval/tiny_gen_text/chars",
         "eval/tiny_gen_text/text_crc"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def task_rows(run_dir) -> dict[int, dict[str, float]]:
    """eval/<task>/<metric> per step of metrics.csv, at the steps that have any."""
    rows = {}
    for step, row in read_metrics(run_dir).items():
        values = {key: float(value) for key, value in row.items() if key.startswith("eval/") and value}
        if values:
            rows[step] = values
    return rows


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    assert main(tiny_args(corpus, run_dir, *TASK_ARGS)) == 0
    return run_dir


def test_tasks_are_logged_at_the_scheduled_steps_and_equal_mptlike_eval_on_those_checkpoints(one_process, capsys):
    rows = task_rows(one_process)
    assert sorted(rows) == [3, 6]  # every 3 steps; step 6 is also the end
    assert rows[3] != rows[6]
    files = ",".join(map(str, TASK_FILES))
    for step, checkpoint in ((3, "step-0000003"), (6, "step-0000006")):
        assert set(rows[step]) == METRICS
        capsys.readouterr()
        # The independent path: the checkpoint read back in one process, lm-eval's simple_evaluate.
        argv = [str(one_process / "checkpoints" / checkpoint), "--tasks", files, "--limit", str(LIMIT),
                "--num-fewshot", "0", "--batch-size", "2", "--device", "cpu", "--json"]
        assert mptlike_eval(argv) == 0
        results = json.loads(capsys.readouterr().out)["results"]
        want = {f"eval/{task}/{key.removesuffix(',none')}": value for task, values in results.items()
                for key, value in values.items() if key.endswith(",none") and "_stderr" not in key}
        assert rows[step] == want, step
    assert 0 < rows[6]["eval/tiny_gen_text/chars"] and math.isfinite(rows[6]["eval/tiny_ppl/bits_per_byte"])
    assert read_metrics(one_process)[3]["val/loss"]  # validation is logged as before, in the same row


@pytest.mark.slow
def test_two_fsdp2_ranks_log_the_metrics_of_one_process(corpus, one_process, tmp_path):
    run_dir = tmp_path / "two"
    torchrun(tiny_args(corpus, run_dir, *TASK_ARGS))
    got, want = task_rows(run_dir), task_rows(one_process)
    assert sorted(got) == sorted(want) == [3, 6]
    for step in want:
        assert set(got[step]) == set(want[step]) == METRICS
        for name, value in want[step].items():
            if name in EXACT:
                assert got[step][name] == value, (step, name)
            else:
                assert got[step][name] == pytest.approx(value, rel=1e-4), (step, name)


# ---- free when unset, and without a trace on training ---------------------------------------------


@pytest.fixture(scope="module")
def without_tasks(corpus, tmp_path_factory):
    """A run with dropout and no eval.tasks, in a fresh interpreter that must never import lm-eval."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from train_helpers import tiny_args
        from mptlike.train.cli import main
        assert main(tiny_args({str(corpus)!r}, {str(run_dir)!r}, "model.resid_pdrop=0.2")) == 0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "lm_eval" or m.endswith("integrations.lm_eval"))
        assert not loaded, loaded
        """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_run_without_tasks_never_imports_lm_eval(without_tasks):
    assert not task_rows(without_tasks)


def test_evaluating_tasks_leaves_training_as_it_was(corpus, without_tasks, tmp_path):
    # Dropout draws from torch's generator: evaluations that changed the random state, or left the
    # model in eval mode, would change every loss after the first of them (step 1 here).
    run_dir = tmp_path / "run"
    args = (*TASK_ARGS[:1], "eval.tasks_every_n_steps=1", "eval.tasks_limit=2", "model.resid_pdrop=0.2")
    assert main(tiny_args(corpus, run_dir, *args)) == 0
    assert sorted(task_rows(run_dir)) == [1, 2, 3, 4, 5, 6]
    for key in ("train/loss", "train/grad_norm", "val/loss"):
        got = {step: row[key] for step, row in read_metrics(run_dir).items() if row.get(key)}
        assert got == {step: row[key] for step, row in read_metrics(without_tasks).items() if row.get(key)}, key


# ---- bad input: one line, exit code 2, nothing written ----------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _other_tokenizer(corpus: Path, tmp: Path) -> Path:
    """The corpus with a manifest naming a trained BPE whose tokenizer.json is not there."""
    copy = tmp / "data"
    copy.mkdir()
    for path in corpus.iterdir():
        (copy / path.name).symlink_to(path)
    manifest = json.loads((corpus / "manifest.json").read_text())
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "bpe:300"}))
    return copy


MC = str(TASKS / "tiny_mc.yaml")


@pytest.mark.parametrize("make_args,expected", [
    (lambda tmp, corpus: ["eval.tasks=[no_such_task_zz]"], "unknown lm-eval task no_such_task_zz"),
    (lambda tmp, corpus: [f"eval.tasks=[{_write(tmp / 'bad.yaml', 'task: x' + chr(10) + 'doc_to_text: [unclosed')}]"],
     "could not be read"),
    (lambda tmp, corpus: [f"eval.tasks=[{tmp / 'missing.yaml'}]"], "does not exist"),
    (lambda tmp, corpus: [f"eval.tasks=[{MC}]", "trainer.backend=composer"], "lm-eval tasks run in the Lightning loop"),
    (lambda tmp, corpus: [f"eval.tasks=[{MC}]", "eval.at_end=false"], "would never run"),
    (lambda tmp, corpus: [f"eval.tasks=[{MC}]", "eval.tasks_limit=0"], "eval.tasks_limit=0 is invalid"),
    (lambda tmp, corpus: [f"eval.tasks=[{MC}]", f"eval.tasks_include_path={tmp / 'nowhere'}"],
     "is not a folder of task YAMLs"),
    (lambda tmp, corpus: [f"eval.tasks=[{MC}]", f"data.path={_other_tokenizer(corpus, tmp)}"],
     "which does not load here"),
], ids=["unknown-task", "bad-yaml", "missing-yaml", "composer", "never-runs", "limit-0", "include-path",
        "no-tokenizer"])
def test_bad_tasks_stop_the_run_with_one_line_before_it_writes(corpus, tmp_path, capsys, make_args, expected):
    run_dir = tmp_path / "run"
    assert main(tiny_args(corpus, run_dir, *make_args(tmp_path, corpus))) == 2
    assert expected in _one_line_error(capsys)
    assert not run_dir.exists()


def test_without_lm_eval_eval_tasks_names_the_extra(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails, as where it is missing
    run_dir = tmp_path / "run"
    assert main(tiny_args(corpus, run_dir, f"eval.tasks=[{MC}]")) == 2
    line = _one_line_error(capsys)
    assert "eval.tasks needs EleutherAI's lm-evaluation-harness" in line and "pip install 'mptlike[eval]'" in line
    assert not run_dir.exists()


def test_a_task_whose_dataset_cannot_load_stops_the_run_before_it_starts(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = _write(tmp_path / "local.yaml", textwrap.dedent(f"""\
        task: tiny_mc_local
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / 'absent.jsonl'}
          cache_dir: {tmp_path / 'cache'}
        output_type: multiple_choice
        test_split: test
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: choices
        doc_to_target: label
        """))
    run_dir = tmp_path / "run"
    # The datasets load once, while the run is set up: before step one and before config.yaml.
    assert main(tiny_args(corpus, run_dir, f"eval.tasks=[{task}]")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "mptlike-train: error: a task's dataset could not be loaded" in err
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
