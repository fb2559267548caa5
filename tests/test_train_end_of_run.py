"""The end of a run (final evaluation, export, sample) with the attention backend and precision of training."""

import importlib
import subprocess
import sys
from pathlib import Path

import gpu_only_attention
import pytest
import torch
from train_helpers import free_port, make_corpus, tiny_args, torchrun_env

from mptlike.model import MPTForCausalLM
from mptlike.train.cli import main

attention_module = importlib.import_module("mptlike.ops.attention")

END_OF_RUN = ("trainer.max_steps=2", "checkpoint.every_n_steps=0", "checkpoint.export_final=true",
              "eval.every_n_steps=0", "eval.at_end=true", "sample.max_new_tokens=6")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def gpu_only(monkeypatch):
    gpu_only_attention.CALLS.clear()
    gpu_only_attention.install(monkeypatch.setattr, monkeypatch.setitem)
    return gpu_only_attention.CALLS


def test_a_run_with_a_gpu_only_backend_samples_and_exports_at_the_end(corpus, tmp_path, gpu_only, capsys):
    run_dir = tmp_path / "run"
    assert main(tiny_args(corpus, run_dir, "model.attn_impl=triton", *END_OF_RUN)) == 0
    assert "sample (temperature" in capsys.readouterr().out
    sampled = [dtype for grad, dtype in gpu_only if not grad]
    assert sampled, "neither the final evaluation nor the sample used the training model"
    model = MPTForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.attn_impl == "triton" and model.config.d_model == 64


def test_end_of_run_evaluation_and_sample_run_in_the_precision_of_the_loop(corpus, tmp_path, monkeypatch, capsys):
    dtypes = []
    sdpa = attention_module._BACKENDS["sdpa"]

    def recording_sdpa(q, *args):
        dtypes.append((torch.is_grad_enabled(), q.dtype))
        return sdpa(q, *args)

    monkeypatch.setitem(attention_module._BACKENDS, "sdpa", recording_sdpa)
    run_dir = tmp_path / "run"
    assert main(tiny_args(corpus, run_dir, "model.attn_impl=sdpa", "trainer.precision=bf16", *END_OF_RUN)) == 0
    assert "sample (temperature" in capsys.readouterr().out
    trained = {dtype for grad, dtype in dtypes if grad}
    after = {dtype for grad, dtype in dtypes if not grad}  # the final evaluation and the sample
    assert trained == {torch.bfloat16}
    assert after == {torch.bfloat16}


@pytest.mark.slow
def test_two_process_fsdp2_run_with_a_gpu_only_backend_reaches_the_end_on_every_rank(corpus, tmp_path):
    run_dir = tmp_path / "run"
    script = Path(gpu_only_attention.__file__)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script),
               *tiny_args(corpus, run_dir, "model.attn_impl=triton", *END_OF_RUN)]
    proc = subprocess.run(command, capture_output=True, text=True, env=torchrun_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "sample (temperature" in proc.stdout
    assert MPTForCausalLM.from_pretrained(run_dir / "final").config.n_layers == 2
