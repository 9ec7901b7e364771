"""Readers of the BEIR layout, so that published BEIR results can be reproduced with MARK.

A BEIR dataset folder holds ``corpus.jsonl`` (``{_id, title, text}``), ``queries.jsonl``
(``{_id, text}``) and ``qrels/<split>.tsv`` (``query-id  corpus-id  score``, with a header).
Malformed lines are a ``DataError`` naming the file and line.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from src.core.errors import DataError
from src.data.readers import Document, JsonLineError, iter_json_objects, read_documents


def _iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    with open(path, encoding="utf-8") as handle:
        try:
            yield from iter_json_objects(handle)
        except JsonLineError as err:
            raise DataError(f"{path}:{err.lineno}: {err.reason}") from None


def is_beir_corpus(path: str | Path) -> bool:
    """Whether a JSONL file's first record is BEIR-style (``_id`` and no ``id``)."""
    for _, obj in _iter_json_lines(Path(path)):
        return "_id" in obj and "id" not in obj
    return False


def read_beir_corpus(path: str | Path) -> list[Document]:
    """BEIR ``corpus.jsonl`` as documents: text is ``title + " " + text`` (as BEIR's
    sentence-transformers models encode it); the title is kept in the metadata."""
    path = Path(path)
    docs, seen = [], set()
    for lineno, obj in _iter_json_lines(path):
        doc_id, title, text = obj.get("_id"), obj.get("title") or "", obj.get("text") or ""
        if doc_id is None:
            raise DataError(f"{path}:{lineno}: _id: missing field")
        doc_id = str(doc_id)
        if doc_id in seen:
            raise DataError(f"{path}:{lineno}: duplicate document id '{doc_id}'")
        full = f"{title} {text}".strip()
        if not full:
            raise DataError(f"{path}:{lineno}: title and text are both empty")
        seen.add(doc_id)
        metadata = dict(obj.get("metadata") or {})
        if title:
            metadata["title"] = title
        docs.append(Document(id=doc_id, text=full, metadata=metadata))
    if not docs:
        raise DataError(f"{path}: no records")
    return docs


def read_beir_queries(path: str | Path) -> dict[str, str]:
    """BEIR ``queries.jsonl`` as ``{query_id: text}``."""
    path = Path(path)
    queries = {}
    for lineno, obj in _iter_json_lines(path):
        if "_id" not in obj or not str(obj.get("text") or "").strip():
            raise DataError(f"{path}:{lineno}: expected {{_id, text}}")
        queries[str(obj["_id"])] = str(obj["text"])
    return queries


def read_beir_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR ``qrels/<split>.tsv`` as ``{query_id: {doc_id: relevance}}`` (header skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for lineno, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(row) < 3:
                raise DataError(f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score)")
            try:
                score = int(float(row[2]))
            except ValueError:
                raise DataError(f"{path}:{lineno}: score: not a number ({row[2]!r})") from None
            qrels.setdefault(row[0].strip(), {})[row[1].strip()] = score
    return qrels


def load_documents(path: str | Path) -> list[Document]:
    """Documents from MARK's ``{id, text, metadata}`` JSONL or a BEIR ``corpus.jsonl``."""
    path = Path(path)
    return read_beir_corpus(path) if is_beir_corpus(path) else read_documents(path)
