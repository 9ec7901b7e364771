"""Chunking by the embedding model's word-pieces keeps every token and never overflows the model."""

from __future__ import annotations

import json

import pytest

from src.core.errors import ConfigError, DataError
from src.data.files import markdown_headings, read_files
from src.data.readers import Document
from src.rag.chunking import check_chunk_size, chunk_document, chunk_text


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


SENTENCE = "The pump moves water from the lower basin to the upper tank every hour. "
STRUCTURED = (
    "# Pumps\n\n"  # heading only: joins its first subsection
    "## Setup\n\nBolt the pump to the floor.\n\n"
    "## Operation\n\n" + "\n\n".join(SENTENCE * 3 for _ in range(6)) + "\n\n"  # 6 paragraphs of ~45 word-pieces
    "## Faults\n\n" + SENTENCE * 20 + "\n"  # one paragraph longer than a chunk
)


def _markdown_doc(text: str) -> Document:
    from src.data.files import _sections, _with_preamble

    sections = _sections(len(text), _with_preamble(text, markdown_headings(text)))
    return Document(id="pumps.md", text=text, metadata={"sections": sections})


def test_chunks_follow_sections_and_paragraphs_within_the_word_piece_limit(encoder):
    tokenizer, size = encoder.tokenizer, 100
    doc = _markdown_doc(STRUCTURED)
    chunks = chunk_document(doc, tokenizer, chunk_size=size, chunk_overlap=16)
    paths = [tuple(c.heading_path) for c in chunks]
    assert paths[0] == ("Pumps", "Setup") and chunks[0].text.startswith("# Pumps\n\n## Setup")  # heading-only parent joined
    operation = [c for c in chunks if c.heading_path == ["Pumps", "Operation"]]
    faults = [c for c in chunks if c.heading_path == ["Pumps", "Faults"]]
    assert len(chunks) == 1 + len(operation) + len(faults) and len(operation) == 3 and len(faults) >= 3
    # Operation: whole paragraphs packed two by two (a third would pass 100 word-pieces), no overlap.
    for chunk in operation[1:]:
        assert chunk.text.startswith(SENTENCE.strip()[:20]) and chunk.text.endswith("every hour.")
    assert all(a.end_token == b.start_token for a, b in zip(operation, operation[1:]))
    # Faults: a paragraph longer than a chunk is windowed with the overlap.
    assert faults[0].text.startswith("## Faults\n\nThe pump")  # the heading starts the first window
    assert all(0 < a.end_token - b.start_token <= 16 for a, b in zip(faults, faults[1:]))
    ids = _tokens(tokenizer, doc.text)
    assert chunks[-1].end_token == len(ids)
    for chunk in chunks:
        assert chunk.end_token - chunk.start_token <= size
        assert chunk.text == doc.text[chunk.start_char : chunk.end_char]
        assert _tokens(tokenizer, chunk.text) == ids[chunk.start_token : chunk.end_token]
        assert len(tokenizer(chunk.text)["input_ids"]) <= encoder.max_seq_length
    for prev, nxt in zip(chunks, chunks[1:]):  # no token lost, no chunk spans two sections
        assert prev.start_token < nxt.start_token <= prev.end_token
        if prev.heading_path != nxt.heading_path:
            assert nxt.start_token == prev.end_token and nxt.text.startswith("## ")
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))


def test_read_files_then_chunk_document_carries_heading_paths(encoder, tmp_path):
    (tmp_path / "guide.md").write_text("Intro words.\n\n# Guide\n\nRead me.\n\n## Install\n\nRun pip.\n")
    [doc] = read_files(tmp_path)
    chunks = chunk_document(doc, encoder.tokenizer, chunk_size=64, chunk_overlap=8)
    assert [(c.heading_path, c.text) for c in chunks] == [
        ([], "Intro words."),
        (["Guide"], "# Guide\n\nRead me."),
        (["Guide", "Install"], "## Install\n\nRun pip."),
    ]


def test_documents_without_sections_chunk_exactly_as_before(encoder, sample_data_dir):
    docs = [json.loads(line) for line in (sample_data_dir / "documents.jsonl").read_text().splitlines()]
    longest = max(docs, key=lambda d: len(d["text"]))
    doc = Document(id=longest["id"], text=longest["text"], metadata=longest.get("metadata") or {})
    expected = chunk_text(doc.id, doc.text, encoder.tokenizer, chunk_size=200, chunk_overlap=32)
    assert chunk_document(doc, encoder.tokenizer, chunk_size=200, chunk_overlap=32) == expected
    assert all(c.heading_path == [] for c in expected)


def test_malformed_sections_are_a_data_error(encoder):
    doc = Document(id="d", text="some text here", metadata={"sections": [{"heading_path": ["A"], "start": 5, "end": 99}]})
    with pytest.raises(DataError, match="document 'd': metadata.sections"):
        chunk_document(doc, encoder.tokenizer, chunk_size=16, chunk_overlap=4)
