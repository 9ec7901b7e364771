"""The JSONL readers: bad lines are DataErrors naming file and line, or skipped and counted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from src.core.errors import DataError
from src.data.readers import (
    read_classification,
    read_documents,
    read_preferences,
    read_rag_eval,
    read_sft,
    write_jsonl,
)


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "sft.jsonl",
        '{"prompt": "What does json.dumps do?", "response": "Serialize obj to a JSON string."}',
        "",
        '{"prompt": "What does json.loads do?", "response": ',
    )
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        read_sft(path)


def test_missing_field_names_the_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "preferences.jsonl",
        '{"prompt": "p", "chosen": "good answer", "rejected": "bad answer"}',
        '{"prompt": "p", "chosen": "good answer"}',
    )
    with pytest.raises(DataError, match=rf"^{path}:2: rejected: missing field$"):
        read_preferences(path)


def test_line_that_is_not_an_object_or_has_empty_text(tmp_path: Path) -> None:
    path = _write(tmp_path / "cls.jsonl", '{"text": "a docstring", "label": "text_and_data"}', '["text", 1]')
    with pytest.raises(DataError, match=rf"^{path}:2: expected a JSON object, got list"):
        read_classification(path)
    path = _write(tmp_path / "docs.jsonl", '{"id": "a", "text": "   "}')
    with pytest.raises(DataError, match=rf"^{path}:1: text: .*text is empty"):
        read_documents(path)


def test_skip_invalid_skips_and_logs_the_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(
        tmp_path / "rag.jsonl",
        '{"query": "How do I parse a URL?", "relevant_docs": ["urllib.parse"]}',
        "not json at all",
        '{"query": "How do I copy a tree?", "relevant_docs": []}',
        '{"query": "How do I start a thread?", "relevant_docs": ["threading"]}',
    )
    # setup_logging() stops "mark" loggers propagating to the root, where caplog listens.
    mark_logger = logging.getLogger("mark")
    mark_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="mark"):
            examples = read_rag_eval(path, skip_invalid=True)
    finally:
        mark_logger.removeHandler(caplog.handler)
    assert [ex.relevant_docs for ex in examples] == [["urllib.parse"], ["threading"]]
    assert any(f"{path}: skipped 2 malformed line(s)" in message for message in caplog.messages)


def test_missing_empty_and_duplicate(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        read_sft(tmp_path / "absent.jsonl")
    empty = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataError, match=rf"^{empty}: no records"):
        read_sft(empty)
    duplicate = _write(tmp_path / "docs.jsonl", '{"id": "json", "text": "one"}', '{"id": "json", "text": "two"}')
    with pytest.raises(DataError, match="duplicate document id 'json'"):
        read_documents(duplicate)


def test_ids_and_labels_are_normalised_and_round_trip(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "docs.jsonl",
        [{"id": 7, "text": "Seven – with a non-ASCII dash.", "metadata": {"module": "x"}}, {"id": "b", "text": "B"}],
    )
    documents = read_documents(path)
    assert [doc.id for doc in documents] == ["7", "b"]
    assert documents[0].text == "Seven – with a non-ASCII dash." and documents[1].metadata == {}
    rag = read_rag_eval(_write(tmp_path / "rag.jsonl", '{"query": "q?", "relevant_docs": [7]}'))
    assert rag[0].relevant_docs == ["7"]
    labels = read_classification(_write(tmp_path / "cls.jsonl", '{"text": "t", "label": 2}'))
    assert labels[0].label == 2
