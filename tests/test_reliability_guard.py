"""An injected NaN loss (MPTLIKE_FAULTS, mptlike.faults) triggers each guard.nonfinite policy as
documented (one process, tiny model)."""

import json

import pytest
import torch
from train_helpers import losses, make_corpus, tiny_args

from mptlike.data import TokenDataset, build_loader
from mptlike.train.cli import main

G = 8  # tiny_args' global batch size


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, run_dir, *extra):
    return tiny_args(corpus, run_dir, "debug.log_sample_ids=true", "eval.every_n_steps=0", "eval.at_end=false",
                     *extra)


@pytest.fixture(scope="module")
def clean_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    assert main(args(corpus, run_dir)) == 0
    return run_dir


def samples_by_step(run_dir):
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "a step was logged twice"
    return {r["step"]: r["samples"] for r in rows}


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "guard_events.jsonl").read_text().splitlines()]


def loader_batch_inputs(corpus, batch_number):
    """input_ids of global batch `batch_number` (1-based) as the loader hands it out to one rank."""
    loader = build_loader(TokenDataset(corpus, "train", seq_len=32), global_batch_size=G, micro_batch_size=2,
                          rank=0, world_size=1, seed=17)
    it = iter(loader)
    micro = [next(it)["input_ids"] for _ in range(batch_number * G // 2)]
    return torch.cat(micro[-G // 2:])


def test_sample_log_names_the_samples_the_loader_hands_out(corpus, clean_run):
    ids = samples_by_step(clean_run)
    assert sorted(ids) == [1, 2, 3, 4, 5, 6]
    dataset = TokenDataset(corpus, "train", seq_len=32)
    for step in (1, 4):
        assert torch.equal(dataset.get_batch(ids[step])["input_ids"], loader_batch_inputs(corpus, step))


def test_stop_exits_2_before_the_update_naming_the_step_and_its_samples(capsys, monkeypatch, corpus, clean_run,
                                                                        tmp_path):
    run_dir = tmp_path / "stop"
    monkeypatch.setenv("MPTLIKE_FAULTS", "nan_at_step=4")
    assert main(args(corpus, run_dir, "guard.nonfinite=stop")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("mptlike-train: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    want_ids = samples_by_step(clean_run)[4]
    assert "step 4: non-finite loss nan" in lines[0]
    assert "[" + ", ".join(map(str, want_ids)) + "]" in lines[0]
    assert "guard.nonfinite=skip|rollback" in lines[0]
    # Nothing poisoned was saved: only the step-3 checkpoint exists, and it is complete.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000003"]
    assert losses(run_dir) == {s: v for s, v in losses(clean_run).items() if s <= 3}
    (event,) = events(run_dir)
    assert event["step"] == 4 and event["action"] == "stop" and event["samples"] == want_ids


def _checkpoint_tensors(path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    state = torch.load(out, weights_only=True)
    del dcp
    flat = {}
    for prefix in ("model", "optim"):
        stack = [(prefix, state[prefix])]
        while stack:
            name, value = stack.pop()
            if isinstance(value, dict):
                stack += [(f"{name}.{k}", v) for k, v in value.items()]
            elif isinstance(value, torch.Tensor):
                flat[name] = value
    return flat


def test_skip_drops_the_update_and_moves_the_data_on(monkeypatch, corpus, clean_run, tmp_path):
    run_dir = tmp_path / "skip"
    monkeypatch.setenv("MPTLIKE_FAULTS", "nan_at_step=2")
    assert main(args(corpus, run_dir, "guard.nonfinite=skip", "guard.max_skips=1",
                     "checkpoint.every_n_steps=1", "trainer.max_steps=3")) == 0
    got = losses(run_dir)
    assert got[1] == losses(clean_run)[1] and got[2] != got[2]  # step 2 logged its NaN
    # Weights and optimizer moments after the skipped step are exactly those after step 1.
    before = _checkpoint_tensors(run_dir / "checkpoints" / "step-0000001")
    after = _checkpoint_tensors(run_dir / "checkpoints" / "step-0000002")
    assert before.keys() == after.keys() and any(k.startswith("optim.") for k in before)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # The data moved on: step 3 read the third global batch, as in the clean run.
    assert samples_by_step(run_dir) == {s: v for s, v in samples_by_step(clean_run).items() if s <= 3}
    (event,) = events(run_dir)
    assert event["step"] == 2 and event["action"] == "skip" and event["samples"] == samples_by_step(clean_run)[2]


def test_skip_stops_once_max_skips_events_were_handled(capsys, monkeypatch, corpus, tmp_path):
    run_dir = tmp_path / "skip0"
    monkeypatch.setenv("MPTLIKE_FAULTS", "nan_at_step=2")
    assert main(args(corpus, run_dir, "guard.nonfinite=skip", "guard.max_skips=0")) == 2
    err = capsys.readouterr().err
    assert "step 2: non-finite loss" in err and "guard.max_skips=0" in err and "Traceback" not in err


def test_rollback_reloads_the_last_checkpoint_and_passes_over_the_bad_batch(monkeypatch, corpus, clean_run, tmp_path):
    run_dir = tmp_path / "rollback"
    monkeypatch.setenv("MPTLIKE_FAULTS", "nan_at_step=5")
    assert main(args(corpus, run_dir, "guard.nonfinite=rollback", "guard.max_skips=1")) == 0
    clean_ids, got_ids = samples_by_step(clean_run), samples_by_step(run_dir)
    # Steps 1-4 (4 replayed from the step-3 checkpoint) are the clean run's, bit for bit.
    clean, got = losses(clean_run), losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in (1, 2, 3, 4)] == [clean[s] for s in (1, 2, 3, 4)]
    assert [got_ids[s] for s in (1, 2, 3, 4)] == [clean_ids[s] for s in (1, 2, 3, 4)]
    # Step 5's batch (the poisoned one) is never trained on; steps 5 and 6 read batches 6 and 7.
    assert got_ids[5] == clean_ids[6]
    from mptlike.train.guard import batch_sample_ids

    assert got_ids[6] == batch_sample_ids(6 * G, G, len(TokenDataset(corpus, "train", seq_len=32)), 17)
    (event,) = events(run_dir)
    assert event["step"] == 5 and event["action"] == "rollback" and event["samples"] == clean_ids[5]
    state = json.loads((run_dir / "checkpoints" / "step-0000006" / "train_state.json").read_text())
    assert state["guard"]["skip_positions"] == [4 * G] and state["loader"]["samples_consumed"] == 7 * G


def test_rollback_without_a_checkpoint_stops_with_exit_2(capsys, monkeypatch, corpus, tmp_path):
    run_dir = tmp_path / "nockpt"
    monkeypatch.setenv("MPTLIKE_FAULTS", "nan_at_step=2")
    assert main(args(corpus, run_dir, "guard.nonfinite=rollback")) == 2
    err = capsys.readouterr().err
    assert "step 2: non-finite loss" in err and "no complete checkpoint to roll back to" in err


@pytest.mark.parametrize("override, words", [
    ("guard.nonfinite=retry", ["guard.nonfinite=retry", "stop, skip, rollback"]),
    ("guard.max_skips=-1", ["guard.max_skips=-1"]),
])
def test_bad_guard_settings_exit_2_with_one_line(capsys, corpus, tmp_path, override, words):
    assert main(args(corpus, tmp_path / "run", override)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words)
    assert not (tmp_path / "run").exists()
