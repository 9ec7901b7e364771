"""Byte-level BPE tokenizer of the Mamba model (src/mamba/tokenizer.py)."""

import pytest

from src.core.errors import CheckpointError, ConfigError
from src.mamba.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, MambaTokenizer

TEXTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "The json module encodes and decodes JSON documents; json.dumps(obj) returns a str.",
    "Create a new thread pool executor with max_workers threads.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return MambaTokenizer.train(TEXTS, vocab_size=400)


def test_special_tokens_have_fixed_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert [tokenizer.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert MIN_VOCAB_SIZE <= tokenizer.vocab_size <= 400


@pytest.mark.parametrize(
    "text",
    ["Return a new list.", "naïve café — 日本語 🙂", "  leading spaces\n\ttabs and\r\nnewlines  ", "x" * 500, "<eos>"],
)
def test_roundtrip_any_text_exactly(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.unk_id not in ids  # byte level: nothing is unknown
    assert tokenizer.decode(ids) == text


def test_merges_make_frequent_words_single_tokens(tokenizer):
    assert len(tokenizer.encode(" json")) == 1
    assert len(tokenizer.encode("Return a new list")) < len("Return a new list")


def test_special_tokens_decode_only_on_request(tokenizer):
    ids = [tokenizer.bos_id] + tokenizer.encode("hello") + [tokenizer.eos_id]
    assert tokenizer.decode(ids) == "hello"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|bos|>hello<|eos|>"


def test_saved_file_loads_on_its_own(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "vocab.json")
    loaded = MambaTokenizer.from_file(path)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.encode("The json module") == tokenizer.encode("The json module")
    from tokenizers import Tokenizer  # plain library, no MARK code

    assert Tokenizer.from_file(str(path)).decode(tokenizer.encode("a str")) == "a str"


def test_vocab_smaller_than_specials_and_bytes_is_refused():
    with pytest.raises(ConfigError, match="at least 260"):
        MambaTokenizer.train(TEXTS, vocab_size=3)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        MambaTokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer"):
        MambaTokenizer.from_file(tmp_path / "bad.json")
