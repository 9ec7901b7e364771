"""Chat ratings as preference pairs that the RLHF DPO stage reads as they are.

The preference file is MARK's ``{prompt, chosen, rejected}`` JSONL (``src.data.readers``'s
``PreferenceExample``, what ``data.preferences_train_file`` names). ``prompt`` is the exact
text the model read (a grounded ``Context: ... Question: ...\\nAnswer:`` prompt, which the
RLHF stages read without a template), ``chosen`` / ``rejected`` the two answers.

* :func:`record_comparison`: two sampled answers compared side by side, the better one picked:
  one pair.
* :func:`record_rating`: one answer rated up or down, logged to the ratings file (``{prompt,
  response, rating, model, time}``); each earlier answer of the same prompt with the opposite
  rating makes a pair with it (up = chosen).

Every append holds an exclusive lock on the file and is fsynced before the lock is released,
so concurrent raters (two browser tabs, two Board processes) never interleave or lose lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from src.core.errors import DataError
from src.data.readers import PreferenceExample


@contextlib.contextmanager
def locked(path: Path) -> Iterator[Path]:
    """An exclusive lock (``flock``) on ``<path>.lock`` for the block's duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _append_line(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (the caller holds the lock). A file whose last line
    lacks its newline (a crash mid-write) gets one first, so the new line stays whole."""
    line = json.dumps(row, ensure_ascii=False) + "\n"
    with open(path, "ab+") as handle:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def _pair(prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    example = PreferenceExample.model_validate({"prompt": prompt, "chosen": chosen.strip(), "rejected": rejected.strip()})
    if example.chosen == example.rejected:
        raise DataError("the two answers are the same text: no preference to record")
    return {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected}


def record_comparison(preferences_file: str | Path, prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    """Append the pair ``(prompt, chosen, rejected)`` to ``preferences_file``; returns it.
    Empty texts or two identical answers are a ``DataError`` (nothing is written)."""
    try:
        row = _pair(prompt, chosen, rejected)
    except ValueError as err:  # pydantic: an empty field
        raise DataError(f"not a preference pair: {err.errors()[0]['loc'][0]} is empty") from None
    path = Path(preferences_file)
    with locked(path):
        _append_line(path, row)
    return row


def ratings_file_for(preferences_file: str | Path) -> Path:
    """Where single ratings are logged: ``<preferences>.ratings.jsonl`` beside the pairs."""
    path = Path(preferences_file)
    return path.with_name(path.stem + ".ratings.jsonl")


def read_ratings(ratings_file: Path) -> list[dict[str, Any]]:
    if not ratings_file.is_file():
        return []
    rows = []
    for line in ratings_file.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash: the ratings are a log, the pairs the data
        if isinstance(row, dict):
            rows.append(row)
    return rows


def record_rating(preferences_file: str | Path, prompt: str, response: str, up: bool, model: str = "") -> list[dict[str, str]]:
    """Log a thumbs up / down of ``response`` to ``prompt`` and append the pairs it completes
    (with every earlier answer of this prompt rated the other way); returns those pairs."""
    if not prompt.strip() or not response.strip():
        raise DataError("nothing to rate: the prompt or the answer is empty")
    ratings = ratings_file_for(preferences_file)
    path = Path(preferences_file)
    rating = 1 if up else -1
    pairs = []
    with locked(path):
        earlier = [r for r in read_ratings(ratings) if r.get("prompt") == prompt and r.get("rating") == -rating]
        for other in earlier:
            if str(other.get("response", "")).strip() == response.strip():
                continue
            chosen, rejected = (response, other["response"]) if up else (other["response"], response)
            pairs.append(_pair(prompt, chosen, rejected))
        _append_line(ratings, {"prompt": prompt, "response": response, "rating": rating, "model": model, "time": round(time.time(), 3)})
        for row in pairs:
            _append_line(path, row)
    return pairs


def count_pairs(preferences_file: str | Path) -> int:
    path = Path(preferences_file)
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
