"""The pieces Composer sees: the ComposerModel's loss, metrics and FLOPs, and the loader's saved position."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("composer")

from mptlike.data import TokenDataset, build_loader  # noqa: E402
from mptlike.data.shards import write_token_folder  # noqa: E402
from mptlike.integrations.composer.data import composer_dataloader  # noqa: E402
from mptlike.integrations.composer.model import ComposerMPT  # noqa: E402
from mptlike.model import MPTConfig, MPTForCausalLM  # noqa: E402

pytestmark = pytest.mark.composer


def tiny_model() -> MPTForCausalLM:
    torch.manual_seed(0)
    return MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=3, max_seq_len=16, vocab_size=97))


def test_loss_is_torch_cross_entropy_of_the_already_shifted_labels():
    model = ComposerMPT(tiny_model())
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))
    labels[0, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    logits = model(batch)
    reference = F.cross_entropy(logits.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model.loss(logits, batch), reference, rtol=1e-6, atol=1e-6)


def test_eval_metrics_are_token_weighted_cross_entropy_and_its_exponential():
    model = ComposerMPT(tiny_model())
    metrics = model.get_metrics(is_train=False)
    assert set(metrics) == {"LanguageCrossEntropy", "LanguagePerplexity"}
    assert model.get_metrics(is_train=True) == {}
    gen = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 97, (b, 16), generator=gen),
                "labels": torch.randint(0, 97, (b, 16), generator=gen)} for b in (2, 5)]
    total, count = 0.0, 0
    for batch in batches:
        logits = model.eval_forward(batch)
        for metric in metrics.values():
            model.update_metric(batch, logits, metric)
        total += F.cross_entropy(logits.reshape(-1, 97), batch["labels"].reshape(-1), reduction="sum").item()
        count += batch["labels"].numel()
    assert metrics["LanguageCrossEntropy"].compute().item() == pytest.approx(total / count, rel=1e-5)
    assert metrics["LanguagePerplexity"].compute().item() == pytest.approx(np.exp(total / count), rel=1e-5)


def test_flops_per_batch_counts_6n_plus_12_layers_d_model_seq_per_token():
    model = ComposerMPT(tiny_model())
    n_params = sum(p.numel() for p in model.model.parameters())
    batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long)}
    per_token = 6 * n_params + 12 * 3 * 32 * 16
    assert model.flops_per_batch(batch) == per_token * 4 * 16


def test_fsdp_units_are_the_transformer_blocks():
    model = ComposerMPT(tiny_model())
    blocks = list(model.model.transformer.blocks)
    assert [m for m in model.model.modules() if model.model.fsdp_wrap_fn(m)] == blocks


def test_param_init_fn_initializes_a_module_as_the_model_init_does():
    model = ComposerMPT(tiny_model())
    block = model.model.transformer.blocks[1]
    std = torch.nn.init.calculate_gain("relu") / np.sqrt(32)  # kaiming_normal_, fan_in = d_model
    torch.manual_seed(5)
    model.param_init_fn(block.attn.Wqkv)
    assert block.attn.Wqkv.weight.std().item() == pytest.approx(std, rel=0.1)
    block.norm_1.weight.data.fill_(3.0)
    model.param_init_fn(block.norm_1)
    assert torch.equal(block.norm_1.weight, torch.ones(32))


@pytest.fixture
def dataset(tmp_path):
    # Token t at stream position t: a sample's first id names the sample.
    stream = np.arange(24 * 4 + 1) % 1000
    write_token_folder(tmp_path, {"train": [stream]}, tokenizer="t", vocab_size=1000, eos_id=0)
    return TokenDataset(tmp_path, seq_len=4)


def _loader(ds):
    return build_loader(ds, global_batch_size=4, micro_batch_size=4, rank=0, world_size=1, seed=3)


def test_loader_state_saved_after_two_steps_resumes_at_the_third_batch(dataset):
    dataloader = composer_dataloader(_loader(dataset))
    it = iter(dataloader)
    next(it), next(it)
    # What Composer calls on the DataLoader's dataset when it checkpoints (its arguments are ignored).
    state = dataloader.dataset.state_dict(0, True)
    assert state["samples_consumed"] == 8  # two global batches, nothing fetched ahead
    resumed = composer_dataloader(_loader(dataset))
    resumed.dataset.load_state_dict(state)
    reference = iter(composer_dataloader(_loader(dataset)))
    third = [next(reference) for _ in range(3)][-1]
    assert torch.equal(next(iter(resumed))["input_ids"], third["input_ids"])


def test_composer_dataloader_refuses_a_loader_that_splits_steps_into_micro_batches(dataset):
    loader = build_loader(dataset, global_batch_size=4, micro_batch_size=2, rank=0, world_size=1, seed=3)
    with pytest.raises(ValueError, match="micro_batch_size"):
        composer_dataloader(loader)
