import json

import pytest
from tokenizers import Tokenizer as RawTokenizer

from mptlike.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from mptlike.errors import MptlikeError

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "naïve café — 東京 🚀\n" * 3,
] * 5


def test_byte_tokenizer_ids_are_utf8_bytes_and_eos_is_256():
    tok = load_tokenizer("bytes")
    text = "héllo 🚀"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "bytes")
    assert tok.decode(tok.encode(text) + [256]) == text


def test_trained_bpe_round_trips_text_it_never_saw():
    tok = train_bpe(iter(CORPUS), 400)
    unseen = "Ünïcödé ∑ 🤖 zebra\ttabs\n\n"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert tok.vocab_size <= 400
    assert tok.tok.id_to_token(tok.eos_id) == "<|endoftext|>"
    # Merges were learned: common code fragments take fewer tokens than bytes.
    assert len(tok.encode(CORPUS[1])) < len(CORPUS[1].encode()) / 2


def test_saved_bpe_loads_from_data_folder_and_from_path(tmp_path):
    tok = train_bpe(iter(CORPUS), 350)
    tok.save(tmp_path / "tokenizer.json")
    reference = RawTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = CORPUS[0] + CORPUS[2]
    for loaded in (
        load_tokenizer("bpe:350", tmp_path),
        load_tokenizer(str(tmp_path)),
        load_tokenizer(str(tmp_path / "tokenizer.json")),
    ):
        assert loaded.encode(text) == reference.encode(text, add_special_tokens=False).ids
        assert loaded.eos_id == tok.eos_id


def test_eos_comes_from_tokenizer_config_when_present(tmp_path):
    tok = train_bpe(iter(CORPUS), 300)
    tok.save(tmp_path / "tokenizer.json")
    other = tok.tok.id_to_token(5)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": other}}))
    assert load_tokenizer(str(tmp_path)).eos_id == 5


@pytest.mark.parametrize("spec", ["bpe:12", "bpe:abc", "bpe:"])
def test_bad_bpe_spec_names_the_spec(spec):
    with pytest.raises(MptlikeError, match="bpe:"):
        load_tokenizer(spec)


def test_bpe_spec_without_a_trained_file_says_to_run_prep(tmp_path):
    with pytest.raises(MptlikeError, match="mptlike-prep"):
        load_tokenizer("bpe:512", tmp_path)


def test_missing_local_tokenizer_path_fails_without_touching_the_network(tmp_path):
    with pytest.raises(MptlikeError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))
    with pytest.raises(MptlikeError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_byte_tokenizer_batch_matches_single_encode():
    tok = ByteTokenizer()
    texts = ["abc", "", "é"]
    assert [a.tolist() for a in tok.encode_batch(texts)] == [tok.encode(t) for t in texts]


def test_ctrl_c_stops_bpe_training_at_once():
    """The Rust trainer runs for seconds here (minutes on a real corpus); Ctrl-C must not wait for it."""
    import os
    import random
    import signal
    import threading
    import time

    import pytest

    from mptlike.data.tokenizer import train_bpe

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 14))) for _ in range(100000)]
    texts = [" ".join(rng.sample(words, 40)) for _ in range(40000)]  # ~8 s of training on 2 cores
    # A shell that starts a job in the background (as CI may) makes it ignore SIGINT; Ctrl-C at a
    # terminal reaches Python's own handler, which is what this test is about.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            train_bpe(texts, 60000)
        assert time.monotonic() - start < 3
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_bpe_smaller_than_asked_says_so(caplog):
    from mptlike.data.tokenizer import train_bpe

    tok = train_bpe(["the cat sat on the mat"] * 10, 70000)
    assert tok.vocab_size < 70000
    assert any("yields only" in r.getMessage() and str(tok.vocab_size) in r.getMessage() for r in caplog.records)
