"""lm-eval over mptlike's own model: the numbers and strings of lm-eval's `hf` model on the exported folder.

One tiny run (a byte-level BPE trained here, a random 2-layer MPT with a 64-token window) is scored by
`MptlikeLM` straight from the run folder and by lm-eval's own `HFLM` on what `mptlike-convert to-hf`
writes. The tasks are the offline YAMLs in tests/data/lm_eval_tasks; nothing touches the network.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

lm_eval = pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mptlike.cli.convert import main as convert  # noqa: E402
from mptlike.cli.eval import main as mptlike_eval  # noqa: E402
from mptlike.data.manifest import Manifest, ShardInfo  # noqa: E402
from mptlike.data.tokenizer import train_bpe  # noqa: E402
from mptlike.integrations.lm_eval import MptlikeLM  # noqa: E402
from mptlike.model import MPTConfig, MPTForCausalLM  # noqa: E402
from mptlike.train.config import DataConfig, TrainConfig, config_to_dict  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
ROOT = Path(__file__).resolve().parents[1]
WINDOW = 64
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# Longer than the 64-token window in every tokenization: both models must drop the same left part.
LONG = "Question: " + " ".join(f"the sky is blue and the grass is green number {i}" for i in range(12))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 32-wide model gains nothing from more threads, and on a busy machine waits for them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_run(root: Path) -> Path:
    """A finished run whose data folder holds a bpe tokenizer trained on the tiny tasks' text."""
    texts = [line for p in sorted(TASKS.glob("*.jsonl")) for line in p.read_text().splitlines()] * 3
    tokenizer = train_bpe(texts, 300)
    data = root / "data"
    data.mkdir(parents=True)
    tokenizer.save(data / "tokenizer.json")
    tokens = np.arange(100, dtype=np.uint16)
    tokens.tofile(data / "val_00000.bin")
    Manifest(tokenizer="bpe:300", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, dtype="uint16",
             num_tokens={"val": 100}, num_documents={"val": 1}, sources=[],
             shards={"val": [ShardInfo("val_00000.bin", 100, hashlib.sha256(tokens.tobytes()).hexdigest())]},
             ).save(data)
    torch.manual_seed(7)
    # More embedding rows than tokenizer ids (as padded vocabularies have); large init for varied logits.
    cfg = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=WINDOW, vocab_size=320,
                    init_name="baseline_", init_std=0.3)
    run = root / "run"
    MPTForCausalLM(cfg).save_pretrained(run / "final")
    train_cfg = TrainConfig(model=cfg, data=DataConfig(path=str(data)))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config_to_dict(train_cfg)))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("lm_eval_run"))


@pytest.fixture(scope="module")
def ours(run_dir):
    return MptlikeLM(path=str(run_dir), batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def theirs(run_dir, tmp_path_factory):
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it (lm-eval[hf])
    from lm_eval.models.huggingface import HFLM

    folder = tmp_path_factory.mktemp("lm_eval_hf") / "hf"
    assert convert(["to-hf", str(run_dir), str(folder)]) == 0
    return HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4)


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def _evaluate(model, **kwargs) -> dict:
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    return simple_evaluate(model=model, tasks=["tiny_mc", "tiny_gen"], task_manager=manager, **kwargs)


@pytest.fixture(scope="module")
def hf_results(theirs):
    return _evaluate(theirs, log_samples=True)


# ---- the adapter against lm-eval's hf model -----------------------------------------------------


def test_loglikelihoods_equal_lm_evals_hf_model_on_the_export(ours, theirs):
    pairs = [
        ("Question: What do bees make?\nAnswer:", " honey"),
        ("Question: What do bees make?\nAnswer: ", "honey"),  # the trailing space moves to the continuation
        ("", "The capital of France is Paris"),  # empty context: the EOS prefix
        ("Two plus two", " equals four, and three plus three equals six"),
        (LONG, " and the sun is yellow"),  # left-truncated to the window
        (LONG, "."),
    ]
    got = ours.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    want = theirs.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    assert len(got) == len(pairs)
    for (logprob, greedy), (ref_logprob, ref_greedy) in zip(got, want):
        assert math.isfinite(logprob) and logprob < 0
        assert logprob == pytest.approx(ref_logprob, abs=1e-4)
        assert greedy == ref_greedy


def test_a_greedy_continuation_is_greedy_for_both_models(ours, theirs):
    context = ours.tok_encode("The opposite of up is")
    continuation = []
    with torch.no_grad():
        for _ in range(5):
            logits = ours.model(torch.tensor([context + continuation])).logits
            continuation.append(int(logits[0, -1].argmax()))
    other = continuation[:-1] + [(continuation[-1] + 1) % 300]
    requests = [(("a", "b"), context, continuation), (("a", "c"), context, other)]
    got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
    want = theirs._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want] == [True, False]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)


def test_rolling_loglikelihoods_equal_hf_across_several_windows(ours, theirs):
    documents = [(LONG + " " + LONG,), ("Cats like to chase mice.",), ("x",)]
    assert len(ours.tok_encode(documents[0][0])) > 3 * WINDOW
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", documents), disable_tqdm=True)
    want = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", documents), disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-4)


def test_greedy_generation_gives_hf_strings_in_ragged_batches(ours, theirs, run_dir):
    settings = {"until": [".", "\n"], "max_gen_toks": 10, "do_sample": False}
    prompts = ["The capital of France is", "Two", LONG, "A week has seven days and", "Snow is white"]
    arguments = [(p, dict(settings)) for p in prompts] + [("One, two, three,", {"until": "four", "max_gen_toks": 6})]
    mine = arguments + [("", settings)]
    got = ours.generate_until(_requests("generate_until", mine), disable_tqdm=True)
    # An empty context starts a new document (EOS first); hf would read a row of padding only, so it gets
    # the EOS as text.
    eos_text = ours.tokenizer.decode([ours.eot_token_id])
    want = theirs.generate_until(_requests("generate_until", arguments + [(eos_text, settings)]), disable_tqdm=True)
    assert got == want
    assert all(got)
    assert not any(stop in text for text in got for stop in (".", "\n"))
    # One row at a time (no padding at all) gives the same strings as the padded batches.
    single = MptlikeLM(path=str(run_dir), batch_size=1, device="cpu")
    assert single.generate_until(_requests("generate_until", mine), disable_tqdm=True) == got


def test_tiny_tasks_score_per_example_as_hf_does(ours, hf_results):
    results = _evaluate(ours, log_samples=True)
    for task in ("tiny_mc", "tiny_gen"):
        mine = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        ref = sorted(hf_results["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine) == len(ref) == 12
        for a, b in zip(mine, ref):
            if task == "tiny_mc":  # one loglikelihood per choice
                assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)
            else:
                assert a["resps"] == b["resps"]
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"]["tiny_mc"][metric] == hf_results["results"]["tiny_mc"][metric]
    assert results["results"]["tiny_gen"]["exact_match,none"] == hf_results["results"]["tiny_gen"]["exact_match,none"]


# ---- mptlike-eval --tasks ---------------------------------------------------------------------------


def test_mptlike_eval_tasks_json_matches_hf(run_dir, hf_results, capsys):
    files = f"{TASKS / 'tiny_mc.yaml'},{TASKS / 'tiny_gen.yaml'}"
    assert mptlike_eval([str(run_dir), "--tasks", files, "--batch-size", "3", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"]["tiny_mc"]["acc,none"] == hf_results["results"]["tiny_mc"]["acc,none"]
    assert out["results"]["tiny_mc"]["acc_norm,none"] == hf_results["results"]["tiny_mc"]["acc_norm,none"]
    assert out["results"]["tiny_gen"]["exact_match,none"] == hf_results["results"]["tiny_gen"]["exact_match,none"]
    assert out["n-samples"]["tiny_mc"]["effective"] == 12


def test_mptlike_eval_prints_lm_evals_table_with_fewshot_and_limit(run_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the task folder resolves from any working directory
    argv = [str(run_dir), "--tasks", "tiny_mc", "--include-path", str(TASKS), "--num-fewshot", "2", "--limit", "3"]
    assert mptlike_eval(argv) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("|tiny_mc"))
    assert [c.strip() for c in row.split("|")][1:6] == ["tiny_mc", "1", "none", "2", "acc"]


# ---- lm-eval's own command line and registry ----------------------------------------------------------


def test_registry_knows_mptlike_next_to_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    assert get_model("mptlike") is MptlikeLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours did not hide lm-eval's models


def test_lm_eval_command_line_runs_model_mptlike(run_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mptlike.integrations.lm_eval", "--model", "mptlike",
               "--model_args", f"path={run_dir}", "--tasks", "tiny_mc", "--include_path", str(TASKS), "--limit", "4",
               "--batch_size", "2", "--output_path", str(out)]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|tiny_mc" in proc.stdout and "mptlike" in proc.stdout
    written = json.loads(next(out.rglob("results_*.json")).read_text())
    # The same four examples scored in this process through the registry name.
    here = simple_evaluate(model="mptlike", model_args={"path": str(run_dir)}, tasks=["tiny_mc"], limit=4,
                           task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    assert written["results"]["tiny_mc"]["acc,none"] == here["results"]["tiny_mc"]["acc,none"]


# ---- bad input: one line, exit code 2 -----------------------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("make_tasks,expected", [
    (lambda tmp: "no_such_task_zz", "unknown lm-eval task no_such_task_zz"),
    (lambda tmp: str(tmp / "missing.yaml"), "does not exist"),
    (lambda tmp: _write(tmp / "broken.yaml", "task: tiny\ndoc_to_text: [unclosed\n"), "could not be read"),
    (lambda tmp: _write(tmp / "notask.yaml", "dataset_path: json\n"), "names no task"),
    (lambda tmp: _write(tmp / "nodata.yaml", _local_task_yaml(tmp / "absent.jsonl", tmp / "c")), "could not be loaded"),
])
def test_bad_tasks_fail_with_one_line(run_dir, tmp_path, capsys, make_tasks, expected):
    assert mptlike_eval([str(run_dir), "--tasks", make_tasks(tmp_path)]) == 2
    assert expected in _one_line_error(capsys)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _local_task_yaml(data_file: Path, cache: Path) -> str:
    """tiny_mc as a user writes a task over local files: the datasets json loader and absolute paths."""
    return textwrap.dedent(f"""\
        task: tiny_mc_local
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data_file}
          cache_dir: {cache}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: choices
        doc_to_target: label
        metric_list:
          - metric: acc
        """)


def test_a_task_over_local_jsonl_files_runs_offline(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = _write(tmp_path / "local.yaml", _local_task_yaml(TASKS / "tiny_mc.jsonl", tmp_path / "cache"))
    assert mptlike_eval([str(run_dir), "--tasks", f"{task},{TASKS / 'tiny_mc.yaml'}", "--limit", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert results["tiny_mc_local"]["acc,none"] == results["tiny_mc"]["acc,none"]


def test_a_checkpoint_without_a_known_tokenizer_asks_for_one(tmp_path, capsys):
    MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=257)).save_pretrained(tmp_path / "m")
    assert mptlike_eval([str(tmp_path / "m"), "--tasks", str(TASKS / "tiny_mc.yaml")]) == 2
    line = _one_line_error(capsys)
    assert "no tokenizer is known" in line and "--tokenizer" in line


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, capsys):
    MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=200)).save_pretrained(tmp_path / "m")
    argv = [str(tmp_path / "m"), "--tokenizer", "bytes", "--tasks", str(TASKS / "tiny_mc.yaml")]
    assert mptlike_eval(argv) == 2
    assert "the tokenizer has 257 ids but the model only vocab_size=200" in _one_line_error(capsys)


def test_the_loss_mode_does_not_import_lm_eval():
    code = "import sys, mptlike.cli.eval, mptlike.model; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_autocast_scores_close_to_fp32_and_generates(run_dir, ours):
    gpu = MptlikeLM(path=str(run_dir), batch_size=4, device="cuda")
    assert gpu.precision == "bf16" and gpu.device.type == "cuda"
    pairs = [("Question: What do bees make?\nAnswer:", " honey"), (LONG, " and the sun is yellow")]
    got = gpu.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    want = ours.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (a, _), (b, _) in zip(got, want):
        assert a == pytest.approx(b, rel=0.05, abs=0.5)
    texts = gpu.generate_until(_requests("generate_until", [("Two", {"until": ["."], "max_gen_toks": 8})]))
    assert len(texts) == 1 and isinstance(texts[0], str)
