import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer as RawTokenizer

from mptlike.data import Manifest, TokenDataset, prepare
from mptlike.data import prep as prep_module
from mptlike.data.corpus import stdlib_files

DOCS = [
    "The first document.\n",
    "Second one, with ünïcödé and an emoji 🚀.\n",
    "def f(x):\n    return x * 2\n" * 20,
    "short",
    "Last document\n\nwith blank lines.\n",
]


def _write_txt(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (folder / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
    return folder


def _stream(out, split="train"):
    m = Manifest.load(out)
    return np.concatenate(
        [np.fromfile(out / s.name, dtype=np.dtype(m.dtype).newbyteorder("<")) for s in m.shards[split]]
    ).astype(np.int64)


def _bytes_reference(docs):
    return [t for d in docs for t in list(d.encode("utf-8")) + [256]]


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_byte_shards_are_each_document_encoded_then_eos(tmp_path):
    out = tmp_path / "out"
    prepare([_write_txt(tmp_path / "in", DOCS)], out, "bytes", val_fraction=0.0, shard_tokens=64)
    assert _stream(out).tolist() == _bytes_reference(DOCS)


def test_bpe_shards_match_the_saved_tokenizer_document_by_document(tmp_path):
    out = tmp_path / "out"
    m = prepare([_write_txt(tmp_path / "in", DOCS)], out, "bpe:300", val_fraction=0.0)
    ref = RawTokenizer.from_file(str(out / "tokenizer.json"))
    eos = ref.token_to_id("<|endoftext|>")
    expected = [t for d in DOCS for t in ref.encode(d, add_special_tokens=False).ids + [eos]]
    assert _stream(out).tolist() == expected
    assert (m.eos_id, m.vocab_size, m.dtype) == (eos, ref.get_vocab_size(), "uint16")


def test_manifest_counts_and_checksums_are_right(tmp_path):
    out = tmp_path / "out"
    prepare([_write_txt(tmp_path / "in", DOCS)], out, "bytes", val_fraction=0.0, shard_tokens=50)
    raw = json.loads((out / "manifest.json").read_text())
    expected_tokens = len(_bytes_reference(DOCS))
    assert raw["num_tokens"]["train"] == expected_tokens
    assert raw["num_documents"]["train"] == len(DOCS)
    assert (raw["tokenizer"], raw["vocab_size"], raw["eos_id"], raw["dtype"]) == ("bytes", 257, 256, "uint16")
    shards = raw["shards"]["train"]
    assert len(shards) == -(-expected_tokens // 50)
    for s in shards:
        data = (out / s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
        assert len(data) == 2 * s["num_tokens"]
    assert sum(s["num_tokens"] for s in shards) == expected_tokens
    assert raw["fingerprint"] and raw["format_version"] == 1


def test_rerun_with_same_inputs_is_a_no_op(tmp_path):
    src = _write_txt(tmp_path / "in", DOCS)
    out = tmp_path / "out"
    first = prepare([src], out, "bpe:300")
    before = _mtimes(out)
    second = prepare([src], out, "bpe:300")
    assert _mtimes(out) == before
    assert second.to_dict() == first.to_dict()


def test_rerun_with_other_options_rebuilds_and_drops_stale_files(tmp_path):
    src = _write_txt(tmp_path / "in", DOCS)
    out = tmp_path / "out"
    prepare([src], out, "bpe:300", val_fraction=0.0, shard_tokens=40)
    prepare([src], out, "bytes", val_fraction=0.0, shard_tokens=10_000)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_00000.bin"]
    assert _stream(out).tolist() == _bytes_reference(DOCS)


def test_validation_fraction_holds_out_whole_documents_deterministically(tmp_path):
    docs = [f"document number {i}\n" for i in range(200)]
    src = _write_txt(tmp_path / "in", docs)
    m = prepare([src], tmp_path / "a", "bytes", val_fraction=0.2, seed=1)
    m2 = prepare([src], tmp_path / "b", "bytes", val_fraction=0.2, seed=1)
    assert m.num_documents == m2.num_documents
    assert 20 <= m.num_documents["val"] <= 60
    assert m.num_documents["train"] + m.num_documents["val"] == 200

    def split_docs(split):
        ids = _stream(tmp_path / "a", split).tolist()
        out, cur = [], []
        for t in ids:
            if t == 256:
                out.append(bytes(cur).decode())
                cur = []
            else:
                cur.append(t)
        return out

    train, val = split_docs("train"), split_docs("val")
    # Every document lands in exactly one split, in its original relative order.
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]
    assert val == [d for d in docs if d in set(val)]
    other_seed = prepare([src], tmp_path / "c", "bytes", val_fraction=0.2, seed=2)
    assert _stream(tmp_path / "c", "val").tolist() != _stream(tmp_path / "a", "val").tolist()
    assert other_seed.num_documents["train"] + other_seed.num_documents["val"] == 200


def test_separate_validation_inputs_become_the_val_split(tmp_path):
    out = tmp_path / "out"
    prepare([_write_txt(tmp_path / "tr", DOCS[:3])], out, "bytes", val_inputs=[_write_txt(tmp_path / "va", DOCS[3:])])
    assert _stream(out, "train").tolist() == _bytes_reference(DOCS[:3])
    assert _stream(out, "val").tolist() == _bytes_reference(DOCS[3:])


def test_jsonl_with_custom_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"body": d, "id": i} for i, d in enumerate(DOCS)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    prepare([path], tmp_path / "out", "bytes", text_field="body", val_fraction=0.0, progress=True)
    assert _stream(tmp_path / "out").tolist() == _bytes_reference(DOCS)


def test_parquet_with_custom_text_field(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": DOCS + [None, ""], "n": list(range(len(DOCS) + 2))}), path)
    prepare([tmp_path], tmp_path / "out", "bytes", text_field="content", val_fraction=0.0)
    assert _stream(tmp_path / "out").tolist() == _bytes_reference(DOCS)


def test_undecodable_bytes_become_replacement_characters(tmp_path):
    (tmp_path / "in").mkdir()
    raw = b"valid start \xff\xfe\x80 then \xe2\x82 cut"
    (tmp_path / "in" / "bad.txt").write_bytes(raw)
    prepare([tmp_path / "in"], tmp_path / "out", "bytes", val_fraction=0.0)
    assert _stream(tmp_path / "out").tolist() == _bytes_reference([raw.decode("utf-8", errors="replace")])


def test_lone_surrogate_escapes_in_jsonl_do_not_break_tokenization(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a\\ud800b"}\n', encoding="utf-8")
    prepare([path], tmp_path / "out", "bpe:260", val_fraction=0.0)
    ref = RawTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert _stream(tmp_path / "out").tolist() == ref.encode("a?b").ids + [ref.token_to_id("<|endoftext|>")]


def test_default_corpus_on_a_stdlib_subset_trains_bpe_and_loads(tmp_path, monkeypatch):
    files = stdlib_files()
    assert all(p.suffix == ".py" for p in files)
    assert not any(part in ("site-packages", "dist-packages") for p in files for part in p.parts)
    subset = files[:20]
    monkeypatch.setattr(prep_module, "stdlib_files", lambda: subset)
    out = prep_module.prepare_default_corpus(tmp_path / "corpus", vocab_size=512)
    m = Manifest.load(out)
    ref = RawTokenizer.from_file(str(out / "tokenizer.json"))
    eos = ref.token_to_id("<|endoftext|>")
    per_doc = [
        ref.encode(p.read_bytes().decode("utf-8", "replace"), add_special_tokens=False).ids + [eos]
        for p in subset
    ]
    assert (m.tokenizer, m.vocab_size, m.eos_id) == ("bpe:512", 512, eos)
    assert m.num_tokens["train"] + m.num_tokens["val"] == sum(map(len, per_doc))
    assert m.num_documents["train"] + m.num_documents["val"] == 20
    assert m.sources[0].startswith("python-stdlib:")
    # The first document always trains, so the first sample is its first tokens.
    assert len(per_doc[0]) > 129
    ds = TokenDataset(out, seq_len=128)
    assert ds[0]["input_ids"].tolist() == per_doc[0][:128]


def test_cli_writes_shards_and_prints_a_summary(tmp_path, capsys):
    src = _write_txt(tmp_path / "in", DOCS)
    val = _write_txt(tmp_path / "val", DOCS[:2])
    code = prep_module.main(
        [str(src), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--val", str(val)]
    )
    assert code == 0
    assert "train: " in capsys.readouterr().out
    assert _stream(tmp_path / "out").tolist() == _bytes_reference(DOCS)
    assert _stream(tmp_path / "out", "val").tolist() == _bytes_reference(DOCS[:2])


def test_local_tokenizer_is_copied_next_to_the_shards_with_its_eos(tmp_path):
    from mptlike.data import load_tokenizer
    from mptlike.data.tokenizer import train_bpe

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    train_bpe(iter(DOCS * 3), 320).save(tok_dir / "tokenizer.json")
    ref = RawTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    custom_eos = ref.id_to_token(7)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": custom_eos}))
    out = tmp_path / "out"
    m = prepare([_write_txt(tmp_path / "in", DOCS)], out, str(tok_dir), val_fraction=0.0)
    assert m.eos_id == 7 and m.tokenizer == str(tok_dir)
    expected = [t for d in DOCS for t in ref.encode(d, add_special_tokens=False).ids + [7]]
    assert _stream(out).tolist() == expected
    # The prepared folder alone is enough to rebuild the tokenizer, EOS included.
    (tok_dir / "tokenizer.json").unlink()
    loaded = load_tokenizer(m.tokenizer, out)
    assert loaded.eos_id == 7 and loaded.encode(DOCS[1]) == ref.encode(DOCS[1], add_special_tokens=False).ids
