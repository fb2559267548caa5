"""Weighted data mixtures (data=mixture): shares per batch and overall, one order at every world size,
exact resume, new phases, epoch caps, validation of data.sources, and a real training run."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from train_helpers import losses, read_metrics, tiny_args

from mptlike.data import TokenDataset
from mptlike.data.mixture import MixtureSchedule, build_mixture_loader, resolve_sources
from mptlike.data.prep import prepare
from mptlike.data.shards import write_token_folder
from mptlike.errors import MptlikeError
from mptlike.train.cli import main

SEQ = 8


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three byte-tokenized folders of different sizes, each with a val split of its own."""
    root = tmp_path_factory.mktemp("mix")
    lib = Path(json.__file__).parent.parent
    made = {}
    for name, files, val in [
        ("code", sorted((lib / "json").glob("*.py")), lib / "textwrap.py"),
        ("prose", [lib / "this.py", lib / "string.py"], lib / "keyword.py"),
        ("small", [lib / "colorsys.py"], lib / "bisect.py"),
    ]:
        prepare(files, root / name, "bytes", val_inputs=[val], progress=False)
        made[name] = root / name
    return made


def _sources(corpora, **weights):
    return resolve_sources([{"path": str(corpora[n]), **w} for n, w in weights.items()])


def _loaders(specs, world_size, g, mb, seed=5):
    return [build_mixture_loader(specs, seq_len=SEQ, with_sequence_id=False, global_batch_size=g, micro_batch_size=mb,
                                 rank=r, world_size=world_size, seed=seed) for r in range(world_size)]


def _global_windows(loaders, n_batches, iters=None):
    """Every rank's micro-batches, interleaved back into the global order of token windows."""
    iters = iters or [iter(lo) for lo in loaders]
    out = []
    for _ in range(n_batches):
        for it, lo in zip(iters, loaders):
            for _ in range(lo.accumulation_steps):
                batch = next(it)
                full = np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)
                out += [tuple(row) for row in full.tolist()]
    return out, iters


def _reference(specs, n_batches, g, seed=5):
    """(source, index) of the stream, and its windows read straight from each folder."""
    sched = MixtureSchedule([s.name for s in specs], [s.weight for s in specs],
                            [len(TokenDataset(s.path, seq_len=SEQ)) for s in specs], [s.epochs for s in specs],
                            global_batch_size=g, seed=seed)
    pairs = []
    for _ in range(n_batches):
        _, src, idx = sched.next_batch()
        pairs += list(zip(src.tolist(), idx.tolist()))
    data = [TokenDataset(s.path, seq_len=SEQ) for s in specs]
    return pairs, [tuple(data[s].windows([i])[0].tolist()) for s, i in pairs]


def _check_shares(batches, weights, g):
    """Per batch within one sample of w*g; cumulative within one sample of w*total (exact arithmetic)."""
    w = [Fraction(x) / sum(Fraction(y) for y in weights) for x in weights]
    total = [0] * len(w)
    for b, counts in enumerate(batches, start=1):
        assert sum(counts) == g
        for i, c in enumerate(counts):
            assert abs(c - w[i] * g) < 1, (b, i, counts)
            total[i] += c
            assert abs(total[i] - w[i] * b * g) < 1, (b, i, total)
    return total


@pytest.mark.parametrize("weights, g", [((5, 3, 2), 16), ((0.61, 0.3, 0.09), 10), ((1, 1, 1), 7),
                                        ((0.97, 0.02, 0.01), 32)])
def test_shares_follow_the_weights_within_one_sample_per_batch_and_overall(weights, g):
    sched = MixtureSchedule(["a", "b", "c"], weights, [10**6] * 3, [None] * 3, global_batch_size=g, seed=0)
    n_batches = -(-10_000 // g)
    batches = []
    for _ in range(n_batches):
        _, src, _ = sched.next_batch()
        batches.append(np.bincount(src, minlength=3).tolist())
    total = _check_shares(batches, weights, g)
    share = np.array(total) / sum(total)
    assert np.allclose(share, np.array(weights) / sum(weights), atol=0.01)


def test_each_source_draws_a_permutation_of_its_samples_per_epoch():
    n = [37, 101]
    sched = MixtureSchedule(["a", "b"], [1, 1], n, [None, None], global_batch_size=6, seed=3)
    drawn = {0: [], 1: []}
    for _ in range(40):  # 120 draws each: a through three epochs and more, b one and more
        _, src, idx = sched.next_batch()
        for s, i in zip(src.tolist(), idx.tolist()):
            drawn[s].append(i)
    for s in (0, 1):
        # A sample comes back only once every other one has had its turn: counts differ by at most one.
        counts = np.bincount(drawn[s], minlength=n[s])
        full, part = divmod(len(drawn[s]), n[s])
        assert counts.min() == full and counts.max() == full + (part > 0)


def test_global_order_is_identical_at_world_sizes_1_2_4_and_reads_the_right_samples(corpora):
    specs = _sources(corpora, code={"weight": 3}, prose={"weight": 1}, small={"weight": 0.5})
    pairs, reference = _reference(specs, 12, 8)
    assert {s for s, _ in pairs} == {0, 1, 2}
    for world_size, mb in ((1, 2), (2, 1), (4, 2)):
        order, _ = _global_windows(_loaders(specs, world_size, 8, mb), 12)
        assert order == reference


def test_resume_at_another_world_size_continues_exactly(corpora):
    specs = _sources(corpora, code={"weight": 2}, prose={"weight": 1})
    full, _ = _global_windows(_loaders(specs, 1, 8, 8), 10)
    saved = _loaders(specs, 2, 8, 2)
    first, _ = _global_windows(saved, 4)
    state = json.loads(json.dumps(saved[0].state_dict()))  # as train_state.json holds it
    assert state == json.loads(json.dumps(saved[1].state_dict()))
    assert state["samples_consumed"] == 32 and sum(state["mixture"]["consumed"].values()) == 32
    resumed = _loaders(specs, 4, 8, 1)
    for lo in resumed:
        lo.load_state_dict(state)
    rest, _ = _global_windows(resumed, 6)
    assert first + rest == full


def test_a_new_phase_applies_new_weights_from_the_resume_and_repeats_nothing(corpora):
    before = _sources(corpora, code={"weight": 1}, prose={"weight": 1})
    after = _sources(corpora, code={"weight": 1}, prose={"weight": 3}, small={"weight": 1})
    loaders = _loaders(before, 1, 10, 10)
    it = iter(loaders[0])
    ids = []
    for _ in range(5):
        next(it)
        ids += loaders[0].batch_ids(loaders[0].samples_consumed - 10)
    state = json.loads(json.dumps(loaders[0].state_dict()))
    phase2 = _loaders(after, 2, 10, 5)
    for lo in phase2:
        lo.load_state_dict(state)
    batches = []
    iters = [iter(lo) for lo in phase2]
    for _ in range(30):
        position = phase2[0].samples_consumed
        for it2 in iters:
            next(it2)
        batch = phase2[0].batch_ids(position)
        assert phase2[1].batch_ids(position) == batch
        ids += batch
        batches.append([sum(x.startswith(f"{n}:") for x in batch) for n in ("code", "prose", "small")])
    _check_shares(batches, (1, 3, 1), 10)
    assert len(ids) == len(set(ids))  # no source has finished an epoch: nothing is seen twice
    # The phase carried each source's stream on: the new counts continue the old ones.
    consumed = phase2[0].state_dict()["mixture"]["consumed"]
    assert consumed == {"code": 25 + sum(b[0] for b in batches), "prose": 25 + sum(b[1] for b in batches),
                        "small": sum(b[2] for b in batches)}


def test_a_capped_source_stops_after_its_epochs_and_leaves_its_share_to_the_others():
    sched = MixtureSchedule(["a", "b", "c"], [2, 1, 1], [10**6, 45, 10**6], [None, 1, None], global_batch_size=8,
                            seed=1)
    drawn_b, after = [], []
    for _ in range(60):
        counts, src, idx = sched.next_batch()
        drawn_b += idx[src == 1].tolist()
        if not sched.active[1]:
            after.append(counts)
    assert sorted(drawn_b) == sorted(set(drawn_b)) and len(drawn_b) <= 45 and len(drawn_b) > 45 - 2
    assert after and all(c[1] == 0 for c in after)
    _check_shares([[c[0], c[2]] for c in after], (2, 1), 8)  # renormalised among a and c


def test_every_source_capped_and_exhausted_is_one_error():
    sched = MixtureSchedule(["a", "b"], [1, 1], [20, 20], [1, 1], global_batch_size=4, seed=0)
    with pytest.raises(MptlikeError, match="reached its epochs cap.*raise data.sources"):
        for _ in range(20):
            sched.next_batch()


def test_tokens_budgets_give_the_weights(corpora):
    specs = _sources(corpora, code={"tokens": 3000}, prose={"tokens": 1000})
    assert [s.weight for s in specs] == [3000, 1000]
    assert [s.name for s in specs] == ["code", "prose"]


@pytest.mark.parametrize("entries, words", [
    ([{"weight": -1}, {"weight": 1}], "data.sources[0].weight=-1 is invalid"),
    ([{"weight": 0}, {"weight": 0}], "data.sources weights are all zero"),
    ([{"weight": 1, "tokens": 10}, {}], "data.sources[0] gives both weight=1 and tokens=10"),
    ([{"weight": 1}, {"tokens": 10}], "mixes weight and tokens"),
    ([{"epochs": 0}, {}], "data.sources[0].epochs=0 is invalid"),
    ([{}, {"path": "/no/such/folder"}], "data.sources[1].path=/no/such/folder does not exist"),
    ([{}, {"name": "code"}], "data.sources[1] is named 'code' like another source"),
])
def test_bad_sources_are_one_line_each(corpora, entries, words):
    given = [{"path": str(corpora[name]), **e} for name, e in zip(("code", "prose"), entries)]
    with pytest.raises(MptlikeError) as exc:
        resolve_sources(given)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def _run(capsys, args):
    code = main(args)
    return code, capsys.readouterr().err


def test_sources_tokenized_differently_are_refused_with_one_line(corpora, tmp_path, capsys):
    other = tmp_path / "other"
    write_token_folder(other, {"train": [np.arange(4000) % 300]}, tokenizer="bpe:300", vocab_size=300, eos_id=0)
    args = tiny_args("unused", tmp_path / "run", "data=mixture", "data.path=null",
                     f"data.sources=[{{path: {corpora['code']}}}, {{path: {other}, name: web}}]")
    code, err = _run(capsys, args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "'code'" in lines[0] and "'web'" in lines[0] and "'bpe:300'" in lines[0], err
    assert not (tmp_path / "run").exists()


def _mixture_args(corpora, run_dir, weights, *extra):
    sources = ", ".join(f"{{path: {corpora[n]}, weight: {w}}}" for n, w in weights.items())
    args = [a for a in tiny_args("unused", run_dir) if not a.startswith("data")]
    return [*args, "data=mixture", f"data.sources=[{sources}]", "debug.log_sample_ids=true", *extra]


def test_training_on_a_mixture_logs_val_loss_per_source_and_a_new_phase_resumes(corpora, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_mixture_args(corpora, run_dir, {"code": 3, "prose": 1}, "trainer.max_steps=3")) == 0
    metrics = read_metrics(run_dir)
    assert sorted(losses(run_dir)) == [1, 2, 3]
    for key in ("val/loss", "val/code/loss", "val/prose/loss"):
        assert float(metrics[3][key]) > 0, key
    code_loss, prose_loss = float(metrics[3]["val/code/loss"]), float(metrics[3]["val/prose/loss"])
    assert min(code_loss, prose_loss) <= float(metrics[3]["val/loss"]) <= max(code_loss, prose_loss)
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert [s.split(":")[0] for s in r["samples"]].count("code") == 6  # 3/4 of 8

    # Phase two: resume from step 3 with other weights; they apply from step 4 on.
    assert main(_mixture_args(corpora, run_dir, {"code": 1, "prose": 1}, "trainer.max_steps=5")) == 0
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows[3:]:
        assert [s.split(":")[0] for s in r["samples"]].count("code") == 4
    seen = [s for r in rows for s in r["samples"]]
    assert len(seen) == len(set(seen))
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5]
    assert "val/code/loss" in read_metrics(run_dir)[5]


def test_mixture_conf_needs_sources(tmp_path, capsys):
    args = [a for a in tiny_args("unused", tmp_path / "run") if not a.startswith("data")]
    code, err = _run(capsys, [*args, "data=mixture"])
    assert code == 2 and "data=mixture needs data.sources" in err and len(err.strip().splitlines()) == 1




def test_a_loader_whose_sources_run_out_raises_only_when_that_batch_is_drawn(corpora):
    specs = resolve_sources([{"path": str(corpora["small"]), "epochs": 1}])
    loader = build_mixture_loader(specs, seq_len=SEQ, with_sequence_id=False, global_batch_size=64,
                                  micro_batch_size=32, rank=0, world_size=1, seed=0, num_workers=1)
    whole = len(TokenDataset(corpora["small"], seq_len=SEQ)) // 64
    it = iter(loader)
    for _ in range(2 * whole):  # the worker prefetches past the end: no error until that batch is drawn
        next(it)
    with pytest.raises(MptlikeError, match="reached its epochs cap"):
        next(it)
