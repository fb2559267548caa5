"""float8 training (parallel.float8, torchao): refused where it cannot run, applied from outside the model to the
blocks' linear layers only, with checkpoints that are the same with float8 on or off. The CPU tests run torchao's
float8 layers on torch's CPU float8 matmul; the GPU tests (sm89+) train with real float8 against bf16."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawn_helpers import spawn
from train_helpers import assert_close_per_step, free_port, losses, make_corpus, tiny_args, torchrun_env

from mptlike.errors import MptlikeError
from mptlike.model import MPTConfig, MPTForCausalLM
from mptlike.parallel import ParallelPlan, apply_float8, materialize, parallelize
from mptlike.parallel import float8 as float8_module
from mptlike.train.checkpoint import Checkpointer
from mptlike.train.cli import main
from mptlike.train.config import compose_config, to_train_config
from mptlike.train.loop import Progress
from mptlike.train.plan import build_plan, check_composer_plan

HELPER = Path(__file__).with_name("float8_cpu_run.py")
CFG = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=128)
# One kv head of width 4: Wqkv is 64 -> 72, not a multiple of 16, so it must stay a plain linear layer.
ODD_CFG = MPTConfig(d_model=64, n_heads=16, kv_n_heads=1, n_layers=2, max_seq_len=32, vocab_size=128)
LAYERS = ("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")
H100 = ("NVIDIA H100 80GB HBM3", (9, 0))
A100 = ("NVIDIA A100-SXM4-80GB", (8, 0))


def _cpu_float8_matmul() -> bool:
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(()), scale_b=torch.ones(()), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="needs torchao (pip install 'mptlike[float8]')")
needs_cpu_float8 = pytest.mark.skipif(importlib.util.find_spec("torchao") is None or not _cpu_float8_matmul(),
                                      reason="needs torchao and a torch with a float8 matmul on CPU")


def _on_meta(cfg=CFG):
    with torch.device("meta"):
        return MPTForCausalLM(cfg)


def _model(cfg=CFG, plan=ParallelPlan(), seed=0):
    model = _on_meta(cfg)
    parallelize(model, plan)
    materialize(model, torch.device("cpu"), seed=seed)
    return model


def _kinds(model):
    return {f"{i}.{name}": type(block.get_submodule(name)).__name__
            for i, block in enumerate(model.transformer.blocks) for name in LAYERS}


def _train(model, steps, lr=3e-3, device="cpu", autocast=False):
    data = torch.randint(0, model.config.vocab_size, (4, 8, model.config.max_seq_len + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        ids = data[step % len(data)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out, optimizer


def _max_relative_difference(got, want):
    return max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))


# ---------------------------------------------------------------------------------------------
# refused at plan time, with one line, before any process group starts


def _plan(tmp_path, *overrides):
    cfg = to_train_config(compose_config(["trainer.progress_bar=false", f"run_dir={tmp_path / 'run'}",
                                          "parallel.float8=true", *overrides]))
    return build_plan(cfg)


def test_float8_without_torchao_is_refused_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    assert main(["trainer.progress_bar=false", f"run_dir={tmp_path / 'run'}", "parallel.float8=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.float8=true needs torchao" in err[0]
    assert "pip install 'mptlike[float8]'" in err[0]
    assert not (tmp_path / "run").exists()


@needs_torchao
def test_float8_without_a_cuda_device_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(float8_module, "cuda_device", lambda: None)
    with pytest.raises(MptlikeError, match=r"parallel.float8=true needs a CUDA GPU \(H100, H200, L40S"):
        _plan(tmp_path)


@needs_torchao
def test_float8_on_a_gpu_older_than_sm89_is_refused_naming_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(float8_module, "cuda_device", lambda: A100)
    with pytest.raises(MptlikeError) as info:
        _plan(tmp_path, "trainer.precision=bf16")
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0) lacks" in str(info.value)
    assert "H100, H200, L40S" in str(info.value)


@needs_torchao
def test_float8_with_fp32_precision_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(float8_module, "cuda_device", lambda: H100)
    with pytest.raises(MptlikeError, match="trainer.precision resolves to fp32: use trainer.precision=bf16"):
        _plan(tmp_path, "trainer.precision=fp32")


@needs_torchao
def test_float8_with_the_cpu_accelerator_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(float8_module, "cuda_device", lambda: H100)
    with pytest.raises(MptlikeError, match="parallel.float8=true with trainer.accelerator=cpu"):
        _plan(tmp_path, "trainer.precision=bf16", "trainer.accelerator=cpu")


def test_rowwise_with_float8_all_gather_is_refused_even_in_a_dry_run(tmp_path):
    with pytest.raises(MptlikeError, match="torchao all-gathers float8 weights with tensorwise scales only"):
        _plan(tmp_path, "parallel.float8_recipe=rowwise", "parallel.float8_all_gather=true", "dry_run=true")


def test_unknown_recipe_is_refused_while_composing(tmp_path):
    with pytest.raises(MptlikeError, match="parallel.float8_recipe=blockwise is unknown: choose one of tensorwise, "
                                           "rowwise"):
        _plan(tmp_path, "parallel.float8_recipe=blockwise")


def test_float8_with_the_composer_backend_is_refused(tmp_path):
    plan = _plan(tmp_path, "trainer.backend=composer", "dry_run=true")
    with pytest.raises(MptlikeError, match="parallel.float8=true with trainer.backend=composer"):
        check_composer_plan(plan)


def test_a_dry_run_plans_float8_for_a_gpu_cluster_from_a_machine_without_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(float8_module, "cuda_device", lambda: None)
    assert main(["model=mpt-1b", "trainer.devices=8", "trainer.global_batch_size=64", "parallel.float8=true",
                 "parallel.float8_recipe=rowwise", f"run_dir={tmp_path / 'run'}", "dry_run=true"]) == 0
    assert "float8: rowwise (torchao)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the conversion: which layers, and nothing else about the model changes


@needs_torchao
def test_float8_converts_the_four_block_linears_and_nothing_else():
    model = _model(plan=ParallelPlan(float8=True))
    assert set(_kinds(model).values()) == {"Float8Linear"}
    converted = {type(m).__name__ for m in model.modules()} - {type(m).__name__ for m in _model().modules()}
    assert converted == {"Float8Linear"}
    assert sum(type(m).__name__ == "Float8Linear" for m in model.modules()) == 4 * CFG.n_layers
    assert type(model.transformer.wte).__name__ == "Embedding"  # the tied head is the embedding


@needs_torchao
def test_layers_whose_dimensions_are_not_multiples_of_16_stay_plain():
    with torch.device("meta"):
        model = MPTForCausalLM(ODD_CFG)
    converted = apply_float8(model.transformer.blocks, "tensorwise")
    assert converted == [f"{i}.{name}" for i in range(2) for name in LAYERS[1:]]
    assert {k: v for k, v in _kinds(model).items() if k.endswith("Wqkv")} == {"0.attn.Wqkv": "Linear",
                                                                               "1.attn.Wqkv": "Linear"}


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_keeps_parameter_names_shapes_and_initial_values(recipe):
    # Converted on meta before materialize, as training does: init_weights must still see out_proj and
    # down_proj as residual layers (their std divided by sqrt(2 * n_layers)).
    plain, converted = _model(), _model(plan=ParallelPlan(float8=True, float8_recipe=recipe))
    want, got = plain.state_dict(), converted.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert type(got[name]) is torch.Tensor and torch.equal(got[name], want[name]), name


@needs_torchao
def test_float8_is_applied_before_activation_checkpointing():
    model = _model(plan=ParallelPlan(float8=True, ac_mode="full"))
    block = model.transformer.blocks[0]
    assert type(block).__name__ == "CheckpointWrapper"
    assert type(block._checkpoint_wrapped_module.attn.Wqkv).__name__ == "Float8Linear"


# ---------------------------------------------------------------------------------------------
# training on CPU (torch's CPU float8 matmul) and checkpoints with float8 on and off


@needs_cpu_float8
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_training_on_cpu_tracks_fp32_losses_within_5_percent(recipe):
    want, _ = _train(_model(), 20)
    got, _ = _train(_model(plan=ParallelPlan(float8=True, float8_recipe=recipe)), 20)
    assert got != want  # the float8 matmuls really ran
    assert _max_relative_difference(got, want) < 0.05, (got, want)
    assert got[-1] < 0.65 * got[0]


@needs_cpu_float8
def test_a_float8_checkpoint_resumes_without_float8_and_back(tmp_path):
    model = _model(plan=ParallelPlan(float8=True))
    _, optimizer = _train(model, 3)
    saver = Checkpointer(tmp_path)
    saver.save(3, model, optimizer, {"progress": Progress(step=3)})
    plain = _model(seed=1)
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=3e-3)
    Checkpointer(tmp_path).load(saver.last_path, plain, plain_optimizer, {"progress": Progress()})
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(optimizer.state[p]["exp_avg"], plain_optimizer.state[q]["exp_avg"]), name
    # ... and back: the plain model's checkpoint into a float8 one.
    saver.save(4, plain, plain_optimizer, {"progress": Progress(step=4)})
    again = _model(plan=ParallelPlan(float8=True), seed=2)
    Checkpointer(tmp_path).load(saver.last_path, again, torch.optim.AdamW(again.parameters(), lr=3e-3),
                                {"progress": Progress()})
    for (name, p), q in zip(plain.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name


@needs_cpu_float8
def test_a_float8_model_exports_plain_weights_that_load_without_torchao(tmp_path):
    model = _model(plan=ParallelPlan(float8=True))
    _train(model, 2)
    model.save_pretrained(tmp_path / "final")
    loaded = MPTForCausalLM.from_pretrained(tmp_path / "final")
    assert {type(m).__name__ for m in loaded.modules()}.isdisjoint({"Float8Linear"})
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------
# FSDP2 over 2 CPU processes: float8 all-gather, the scales after each step, a checkpoint without float8


def _fsdp_float8(rank, tmp_path, want):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from mptlike.parallel.float8 import precompute_scales_after_step

    with torch.device("meta"):
        model = MPTForCausalLM(CFG)
    parallelize(model, ParallelPlan(float8=True), mesh=init_device_mesh("cpu", (2,)))
    materialize(model, torch.device("cpu"), seed=0, init="rank0", build_full=_on_meta)
    weight = model.transformer.blocks[0].attn.Wqkv.weight
    assert isinstance(weight.to_local(), WeightWithDynamicFloat8CastTensor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    refresh = precompute_scales_after_step(optimizer, model)
    assert refresh is not None and weight._local_tensor._precomputed_scale is None
    data = torch.randint(0, CFG.vocab_size, (4, 8, CFG.max_seq_len + 1), generator=torch.Generator().manual_seed(0))
    got = []
    for step in range(6):
        ids = data[step % 4][rank * 4:(rank + 1) * 4]  # each rank its half of the batch
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reduced = loss.detach().clone()
        torch.distributed.all_reduce(reduced)
        got.append(reduced.item() / 2)
    # The hook computed the scale the next all-gather uses: max float8 over the whole weight's amax.
    expected = torch.finfo(torch.float8_e4m3fn).max / weight.full_tensor().abs().max()
    torch.testing.assert_close(weight._local_tensor._precomputed_scale, expected, rtol=1e-6, atol=0)
    # Every rank took half the batch: tensorwise input scales differ per rank, so not bit-equal to one process.
    assert _max_relative_difference(got, want) < 0.02, (got, want)
    saver = Checkpointer(tmp_path)
    saver.save(6, model, optimizer, {"progress": Progress(step=6)})
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        assert all(type(v) is torch.Tensor for v in full.values())
        torch.save(full, tmp_path / "full.pt")


@needs_cpu_float8
@pytest.mark.slow
def test_fsdp2_gathers_float8_weights_and_its_checkpoint_loads_without_float8(tmp_path):
    want, _ = _train(_model(plan=ParallelPlan(float8=True)), 6)
    spawn(_fsdp_float8, tmp_path, tmp_path, want)
    full = torch.load(tmp_path / "full.pt")
    plain = _model(seed=1)
    Checkpointer(tmp_path).load(tmp_path / "checkpoints" / "step-0000006", plain, None, {"progress": Progress()})
    assert list(plain.state_dict()) == list(full)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, full[name]), name


def _float8_run(args, nproc=1):
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, str(HELPER), *args], capture_output=True, text=True,
                          env=torchrun_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@needs_cpu_float8
@pytest.mark.slow
def test_the_loop_trains_float8_under_fsdp2_and_its_checkpoint_resumes_without_float8(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    one, two, plain = tmp_path / "one", tmp_path / "two", tmp_path / "plain"
    _float8_run(tiny_args(corpus, one))
    _float8_run(tiny_args(corpus, two), nproc=2)
    # Each rank casts its own micro-batches with their own scales: close to one process, not equal.
    assert_close_per_step(losses(two), losses(one), rel=0.02)
    assert main(tiny_args(corpus, plain, f"resume={two / 'checkpoints' / 'step-0000003'}")) == 0
    resumed, float8 = losses(plain), losses(two)
    assert sorted(resumed) == [4, 5, 6]
    assert_close_per_step(resumed, {step: float8[step] for step in resumed}, rel=0.05)
    assert any(abs(resumed[step] - float8[step]) > 1e-4 for step in resumed)  # float8 was on, and now is off


# ---------------------------------------------------------------------------------------------
# GPU: real float8 matmuls against bf16


needs_sm89 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                                reason="needs a CUDA GPU of compute capability 8.9+ (float8 matmuls)")


@pytest.mark.gpu
@needs_torchao
@needs_sm89
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_training_on_gpu_tracks_bf16_losses(recipe):
    cfg = MPTConfig(d_model=256, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=512)

    def model(plan):
        with torch.device("meta"):
            m = MPTForCausalLM(cfg)
        parallelize(m, plan)
        materialize(m, torch.device("cuda"), seed=0)
        return m

    want, _ = _train(model(ParallelPlan()), 30, device="cuda", autocast=True)
    got, _ = _train(model(ParallelPlan(float8=True, float8_recipe=recipe)), 30, device="cuda", autocast=True)
    assert got != want
    assert _max_relative_difference(got, want) < 0.05, (got, want)
    assert got[-1] < 0.5 * got[0]


@pytest.mark.gpu
@needs_torchao
@needs_sm89
def test_float8_run_trains_through_the_cli_on_one_gpu(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    args = ["trainer=gpu", "model.d_model=128", "model.n_heads=4", "model.n_layers=2", "model.max_seq_len=64",
            "model.vocab_size=320", "data=folder", f"data.path={corpus}", "trainer.global_batch_size=16",
            "trainer.micro_batch_size=8", "trainer.max_steps=8", "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false", "optim.lr=3e-3", "optim.warmup_steps=2", "eval.every_n_steps=0",
            "checkpoint.every_n_steps=0", "sample.max_new_tokens=0", "parallel.float8=true",
            f"run_dir={tmp_path / 'run'}"]
    assert main(args) == 0
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 9)) and got[8] < got[1]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
