"""Split documents into chunks that the embedding model sees in full.

all-MiniLM-L6-v2 reads at most 256 word-pieces (including [CLS] and [SEP]) and silently
drops the rest, so a long document is cut into windows of ``chunk_size`` word-pieces of
the model's own tokenizer, consecutive windows sharing ``chunk_overlap`` word-pieces.
Windows end on word boundaries, so a chunk's text tokenizes back to exactly its window
and the union of the windows is every token of the document.
"""

from __future__ import annotations

from dataclasses import dataclass

from src.core.errors import ConfigError


@dataclass(frozen=True)
class Chunk:
    """A window of a document: ``text == document_text[start_char:end_char]``.

    ``start_token`` / ``end_token`` index the document's word-pieces (end exclusive).
    """

    doc_id: str
    chunk_index: int
    text: str
    start_char: int
    end_char: int
    start_token: int
    end_token: int


def check_chunk_size(chunk_size: int, max_seq_length: int, num_special_tokens: int) -> None:
    """A ``ConfigError`` unless a chunk plus the special tokens fits in the model's input."""
    limit = max_seq_length - num_special_tokens
    if chunk_size > limit:
        raise ConfigError(
            f"model.chunk_size: {chunk_size} word-pieces do not fit the embedding model "
            f"(max_seq_length {max_seq_length} minus {num_special_tokens} special tokens = {limit})"
        )


def chunk_text(doc_id: str, text: str, tokenizer, chunk_size: int, chunk_overlap: int) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``chunk_size`` word-pieces of ``tokenizer``.

    ``tokenizer`` is a fast Hugging Face tokenizer (it must give offsets and word ids).
    A window that would end inside a word is shortened to the word's start, unless the
    word alone is longer than a window (then it is split between word-pieces). Returns
    the chunks in document order; a document with no tokens gives none.
    """
    if not 0 <= chunk_overlap < chunk_size:
        raise ConfigError(f"chunk_overlap ({chunk_overlap}) must be in [0, chunk_size={chunk_size})")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoding["offset_mapping"]
    word_ids = encoding.word_ids()
    num_tokens = len(offsets)
    # A window may start or end at token i only if token i begins a new word.
    starts_word = [i == 0 or word_ids[i] != word_ids[i - 1] for i in range(num_tokens)] + [True]

    chunks: list[Chunk] = []
    start = 0
    while start < num_tokens:
        end = min(start + chunk_size, num_tokens)
        if end < num_tokens:
            boundary = end
            while boundary > start and not starts_word[boundary]:
                boundary -= 1
            if boundary > start:
                end = boundary
        start_char, end_char = offsets[start][0], offsets[end - 1][1]
        chunks.append(Chunk(doc_id, len(chunks), text[start_char:end_char], start_char, end_char, start, end))
        if end >= num_tokens:
            break
        # Step back by the overlap, to a word start, but always move forward.
        next_start = max(end - chunk_overlap, start + 1)
        while next_start < end and not starts_word[next_start]:
            next_start += 1
        start = next_start
    return chunks
