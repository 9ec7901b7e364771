"""Readers for MARK's JSONL data formats.

Each line is one JSON object validated against a record schema. A malformed line is a
``DataError`` naming the file and line number; with ``skip_invalid=True`` bad lines are
skipped and counted, and the count is logged (never silent).

Formats:
    documents       {id, text, metadata}
    classification  {text, label}            label: a name or an index
    rag eval        {query, relevant_docs}
    sft             {prompt, response}
    preferences     {prompt, chosen, rejected}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from src.core.errors import DataError
from src.core.logging import get_logger


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Document(Record):
    id: str
    text: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id", mode="before")
    @classmethod
    def _id_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty")
        return value


class ClassificationExample(Record):
    text: str = Field(min_length=1)
    label: Union[int, str]


class RagEvalExample(Record):
    query: str = Field(min_length=1)
    relevant_docs: list[str] = Field(min_length=1)

    @field_validator("relevant_docs", mode="before")
    @classmethod
    def _ids_to_str(cls, value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else value


class SFTExample(Record):
    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)


class PreferenceExample(Record):
    prompt: str = Field(min_length=1)
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)


RecordT = TypeVar("RecordT", bound=Record)


class JsonLineError(ValueError):
    """A JSONL line that is not a JSON object: ``lineno`` and ``reason``."""

    def __init__(self, lineno: int, reason: str) -> None:
        self.lineno, self.reason = lineno, reason
        super().__init__(f"line {lineno}: {reason}")


def iter_json_objects(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank JSONL line; a bad line raises ``JsonLineError``."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise JsonLineError(lineno, f"invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise JsonLineError(lineno, f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def iter_jsonl(path: str | Path, schema: type[RecordT], skip_invalid: bool = False) -> Iterator[RecordT]:
    """Yield validated records from a JSONL file (blank lines are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    skipped = 0
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                record = schema.model_validate(obj)
            except (ValueError, ValidationError) as err:
                if skip_invalid:
                    skipped += 1
                    continue
                raise DataError(f"{path}:{lineno}: {_describe(err)}") from None
            yield record
    if skipped:
        get_logger("data").warning("%s: skipped %d malformed line(s)", path, skipped)


def read_jsonl(path: str | Path, schema: type[RecordT], skip_invalid: bool = False) -> list[RecordT]:
    """All validated records of a JSONL file; an empty file is a ``DataError``."""
    records = list(iter_jsonl(path, schema, skip_invalid))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def write_jsonl(path: str | Path, records: list[dict | BaseModel]) -> Path:
    """Write records as JSONL atomically."""
    from src.core.checkpoint import atomic_write_text

    lines = [
        (r.model_dump_json() if isinstance(r, BaseModel) else json.dumps(r, ensure_ascii=False)) for r in records
    ]
    return atomic_write_text(Path(path), "\n".join(lines) + ("\n" if lines else ""))


def read_documents(path: str | Path, skip_invalid: bool = False) -> list[Document]:
    docs = read_jsonl(path, Document, skip_invalid)
    seen: set[str] = set()
    for doc in docs:
        if doc.id in seen:
            raise DataError(f"{path}: duplicate document id '{doc.id}'")
        seen.add(doc.id)
    return docs


def read_classification(path: str | Path, skip_invalid: bool = False) -> list[ClassificationExample]:
    return read_jsonl(path, ClassificationExample, skip_invalid)


def read_rag_eval(path: str | Path, skip_invalid: bool = False) -> list[RagEvalExample]:
    return read_jsonl(path, RagEvalExample, skip_invalid)


def read_sft(path: str | Path, skip_invalid: bool = False) -> list[SFTExample]:
    return read_jsonl(path, SFTExample, skip_invalid)


def read_preferences(path: str | Path, skip_invalid: bool = False) -> list[PreferenceExample]:
    return read_jsonl(path, PreferenceExample, skip_invalid)


def _describe(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = "missing field" if first["type"] == "missing" else first["msg"]
        return f"{key}: {msg}" if key else msg
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err.msg} at column {err.colno})"
    return str(err)
