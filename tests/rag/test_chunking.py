"""Chunking by the embedding model's word-pieces keeps every token and never overflows the model."""

from __future__ import annotations

import json

import pytest

from src.core.errors import ConfigError
from src.rag.chunking import check_chunk_size, chunk_text


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _assert_covers_every_token(tokenizer, text, chunks, chunk_size):
    ids = _tokens(tokenizer, text)
    assert chunks[0].start_token == 0 and chunks[-1].end_token == len(ids)
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.start_token <= prev.end_token, "a gap between chunks would lose tokens"
        assert nxt.start_token > prev.start_token
    covered = set()
    for chunk in chunks:
        assert chunk.end_token - chunk.start_token <= chunk_size
        assert chunk.text == text[chunk.start_char : chunk.end_char]
        covered.update(range(chunk.start_token, chunk.end_token))
    assert covered == set(range(len(ids)))


def test_long_document_chunks_cover_every_token_and_retokenize_exactly(encoder, sample_data_dir):
    docs = [json.loads(line) for line in (sample_data_dir / "documents.jsonl").read_text().splitlines()]
    longest = max(docs, key=lambda d: len(d["text"]))
    tokenizer = encoder.tokenizer
    ids = _tokens(tokenizer, longest["text"])
    assert len(ids) > 5 * encoder.max_seq_length  # far beyond what MiniLM reads in one pass

    chunks = chunk_text(longest["id"], longest["text"], tokenizer, chunk_size=200, chunk_overlap=32)
    _assert_covers_every_token(tokenizer, longest["text"], chunks, 200)
    for chunk in chunks:
        # Windows end on word boundaries: the chunk text is exactly its window of word-pieces,
        # so the model sees all of it (200 + [CLS] + [SEP] <= 256).
        assert _tokens(tokenizer, chunk.text) == ids[chunk.start_token : chunk.end_token]
        assert len(tokenizer(chunk.text)["input_ids"]) <= encoder.max_seq_length
    overlaps = [prev.end_token - nxt.start_token for prev, nxt in zip(chunks, chunks[1:])]
    assert all(0 <= o <= 32 for o in overlaps) and max(overlaps) >= 28


def test_short_document_is_one_chunk(encoder):
    text = "Binary search finds the insertion point in a sorted list."
    chunks = chunk_text("bisect", text, encoder.tokenizer, chunk_size=200, chunk_overlap=32)
    assert len(chunks) == 1
    assert chunks[0].text == text and (chunks[0].start_char, chunks[0].end_char) == (0, len(text))
    assert chunks[0].end_token == len(_tokens(encoder.tokenizer, text))


def test_word_longer_than_a_chunk_is_split_without_losing_tokens(encoder):
    # One 96-character 'word' of 96 word-pieces (BERT maps words over 100 characters to [UNK]).
    text = "start " + "qzxv" * 24 + " end of the text"
    chunks = chunk_text("blob", text, encoder.tokenizer, chunk_size=16, chunk_overlap=4)
    assert len(chunks) > 2
    _assert_covers_every_token(encoder.tokenizer, text, chunks, 16)


def test_chunk_size_must_fit_the_model(encoder):
    check_chunk_size(254, encoder.max_seq_length, encoder.num_special_tokens)
    with pytest.raises(ConfigError, match="do not fit") as err:
        check_chunk_size(255, encoder.max_seq_length, encoder.num_special_tokens)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        chunk_text("d", "some text", encoder.tokenizer, chunk_size=8, chunk_overlap=8)
