"""Split documents into chunks that the embedding model sees in full.

all-MiniLM-L6-v2 reads at most 256 word-pieces (including [CLS] and [SEP]) and silently
drops the rest, so a long document is cut into windows of ``chunk_size`` word-pieces of
the model's own tokenizer, consecutive windows sharing ``chunk_overlap`` word-pieces.
Windows end on word boundaries, so a chunk's text tokenizes back to exactly its window
and the union of the windows is every token of the document.

A document whose metadata has ``sections`` (headings, from :mod:`src.data.files`) is cut
along them by :func:`chunk_document`: a section that fits is one chunk, a longer one is
packed paragraph by paragraph (a paragraph longer than a chunk is windowed as above),
and every chunk carries its section's ``heading_path``. A document without sections is
chunked exactly as :func:`chunk_text` does.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from src.core.errors import ConfigError, DataError


@dataclass(frozen=True)
class Chunk:
    """A window of a document: ``text == document_text[start_char:end_char]``.

    ``start_token`` / ``end_token`` index the document's word-pieces (end exclusive).
    ``heading_path`` is the section's headings, outermost first (empty without sections).
    """

    doc_id: str
    chunk_index: int
    text: str
    start_char: int
    end_char: int
    start_token: int
    end_token: int
    heading_path: list[str] = field(default_factory=list)


def check_chunk_size(chunk_size: int, max_seq_length: int, num_special_tokens: int) -> None:
    """A ``ConfigError`` unless a chunk plus the special tokens fits in the model's input."""
    limit = max_seq_length - num_special_tokens
    if chunk_size > limit:
        raise ConfigError(
            f"model.chunk_size: {chunk_size} word-pieces do not fit the embedding model "
            f"(max_seq_length {max_seq_length} minus {num_special_tokens} special tokens = {limit})"
        )


def _check_overlap(chunk_size: int, chunk_overlap: int) -> None:
    if not 0 <= chunk_overlap < chunk_size:
        raise ConfigError(f"chunk_overlap ({chunk_overlap}) must be in [0, chunk_size={chunk_size})")


def _tokenize(text: str, tokenizer) -> tuple[list[tuple[int, int]], list[bool]]:
    """Word-piece char offsets, and whether each token (and the end) may start or end a window."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoding["offset_mapping"]
    word_ids = encoding.word_ids()
    # A window may start or end at token i only if token i begins a new word.
    starts_word = [i == 0 or word_ids[i] != word_ids[i - 1] for i in range(len(offsets))] + [True]
    return offsets, starts_word


def _windows(starts_word: list[bool], lo: int, hi: int, chunk_size: int, chunk_overlap: int) -> list[tuple[int, int]]:
    """Token windows ``(start, end)`` over ``[lo, hi)``: at most ``chunk_size`` long, on word
    boundaries where a word allows it, consecutive ones sharing up to ``chunk_overlap``."""
    windows = []
    start = lo
    while start < hi:
        end = min(start + chunk_size, hi)
        if end < hi:
            boundary = end
            while boundary > start and not starts_word[boundary]:
                boundary -= 1
            if boundary > start:
                end = boundary
        windows.append((start, end))
        if end >= hi:
            break
        # Step back by the overlap, to a word start, but always move forward.
        next_start = max(end - chunk_overlap, start + 1)
        while next_start < end and not starts_word[next_start]:
            next_start += 1
        start = next_start
    return windows


def chunk_text(doc_id: str, text: str, tokenizer, chunk_size: int, chunk_overlap: int) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``chunk_size`` word-pieces of ``tokenizer``.

    ``tokenizer`` is a fast Hugging Face tokenizer (it must give offsets and word ids).
    A window that would end inside a word is shortened to the word's start, unless the
    word alone is longer than a window (then it is split between word-pieces). Returns
    the chunks in document order; a document with no tokens gives none.
    """
    _check_overlap(chunk_size, chunk_overlap)
    offsets, starts_word = _tokenize(text, tokenizer)
    return [
        Chunk(doc_id, i, text[offsets[start][0] : offsets[end - 1][1]], offsets[start][0], offsets[end - 1][1], start, end)
        for i, (start, end) in enumerate(_windows(starts_word, 0, len(offsets), chunk_size, chunk_overlap))
    ]


def _section_ranges(doc_id: str, text: str, sections: Any) -> list[tuple[int, int, list[str]]]:
    """``(start_char, end_char, heading_path)`` of a document's sections, checked."""
    try:
        ranges = [(int(s["start"]), int(s["end"]), [str(h) for h in s["heading_path"]]) for s in sections]
    except (TypeError, KeyError, ValueError):
        raise DataError(f"document '{doc_id}': metadata.sections must be a list of {{heading_path, start, end}}") from None
    previous_end = 0
    for start, end, _ in ranges:
        if not (previous_end <= start <= end <= len(text)):
            raise DataError(f"document '{doc_id}': metadata.sections must be ordered, non-overlapping char ranges of its text")
        previous_end = end
    return ranges


def _is_heading_only(text: str) -> bool:
    # A section is its heading line followed by its body; here the body is blank.
    return not "".join(text.strip().split("\n")[1:]).strip()


def _paragraph_windows(
    text: str, offsets, starts_word, lo: int, hi: int, chunk_size: int, chunk_overlap: int
) -> list[tuple[int, int]]:
    """Windows over a section ``[lo, hi)`` longer than a chunk: whole paragraphs (split at blank
    lines) packed up to ``chunk_size`` tokens; a paragraph longer than that is windowed together
    with the short paragraphs packed before it (so a heading never ends up alone)."""
    starts = [lo] + [i for i in range(lo + 1, hi) if text.count("\n", offsets[i - 1][1], offsets[i][0]) >= 2]
    paragraphs = list(zip(starts, starts[1:] + [hi]))
    windows: list[tuple[int, int]] = []
    current = None
    for a, b in paragraphs:
        if b - a > chunk_size:  # windowed, starting with the paragraphs packed so far (e.g. the heading)
            windows += _windows(starts_word, current[0] if current else a, b, chunk_size, chunk_overlap)
            current = None
        elif current and b - current[0] <= chunk_size:
            current = (current[0], b)
        else:
            if current:
                windows.append(current)
            current = (a, b)
    if current:
        windows.append(current)
    return windows


def chunk_document(doc, tokenizer, chunk_size: int, chunk_overlap: int) -> list[Chunk]:
    """The chunks of a document (``id``, ``text``, ``metadata``), following its sections.

    Without ``metadata["sections"]`` this is :func:`chunk_text`. With them, each section
    is cut on its own (no chunk spans two sections, except that a section holding only
    its heading joins the subsection right after it): one chunk when it fits in
    ``chunk_size`` word-pieces, else its paragraphs packed into chunks of at most
    ``chunk_size`` (a paragraph longer than that is windowed with ``chunk_overlap``).
    Every chunk carries its section's ``heading_path``.
    """
    _check_overlap(chunk_size, chunk_overlap)
    sections = (doc.metadata or {}).get("sections")
    if not sections:
        return chunk_text(doc.id, doc.text, tokenizer, chunk_size, chunk_overlap)
    text = doc.text
    offsets, starts_word = _tokenize(text, tokenizer)
    token_starts = [start for start, _ in offsets]
    groups: list[tuple[int, int, list[str]]] = []  # token ranges per section
    pending_lo = None  # a heading-only section waiting for its subsection
    for start, end, path in _section_ranges(doc.id, text, sections):
        lo, hi = bisect_left(token_starts, start), bisect_left(token_starts, end)
        if pending_lo is not None:
            parent_path = groups.pop()[2]
            if path[: len(parent_path)] == parent_path and len(path) > len(parent_path):
                lo = pending_lo
            else:
                groups.append((pending_lo, lo, parent_path))
            pending_lo = None
        if lo == hi:
            continue
        groups.append((lo, hi, path))
        if path and _is_heading_only(text[start:end]):
            pending_lo = lo
    chunks: list[Chunk] = []
    for lo, hi, path in groups:
        windows = [(lo, hi)] if hi - lo <= chunk_size else _paragraph_windows(text, offsets, starts_word, lo, hi, chunk_size, chunk_overlap)
        for s, e in windows:
            start_char, end_char = offsets[s][0], offsets[e - 1][1]
            chunks.append(Chunk(doc.id, len(chunks), text[start_char:end_char], start_char, end_char, s, e, list(path)))
    return chunks
