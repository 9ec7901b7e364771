"""The text MARK's language models read for a grounded answer or a chat, in one place.

The server's ``/query`` and ``/v1/chat/completions``, the LangChain graph and the RLHF
data (``src.data.prepare``'s retrieval-grounded SFT and preference examples) all build
their prompts here, so a model is trained on exactly the layout it is served with. The
layout ends each turn on a new line and the answer after ``Answer:`` / ``Assistant:``,
so generation is stopped at the start of the next turn (``CHAT_STOP``, ``ANSWER_STOP``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# Passages are cut so a prompt stays short: Mamba reads any length, but prefill time grows with it.
MAX_PASSAGE_CHARS = 600
MAX_CONTEXT_CHARS = 2400
ANSWER_STOP = ("\nQuestion:", "\n\n")
CHAT_STOP = ("\nUser:", "\nSystem:")

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "human": "User", "ai": "Assistant"}


@dataclass(frozen=True)
class Passage:
    """A retrieved text and the document it comes from."""

    doc_id: str
    text: str


def select_passages(passages: Sequence[Passage], max_chars: int = MAX_CONTEXT_CHARS, max_passage_chars: int = MAX_PASSAGE_CHARS) -> list[Passage]:
    """The passages that fit in ``max_chars``, best first, each cut to ``max_passage_chars``
    (at a word boundary when there is one). The result's doc ids are the ones the prompt uses."""
    chosen: list[Passage] = []
    used = 0
    for passage in passages:
        text = " ".join(passage.text.split())
        if len(text) > max_passage_chars:
            cut = text[:max_passage_chars]
            text = (cut.rsplit(" ", 1)[0] if " " in cut else cut) + " ..."
        if chosen and used + len(text) > max_chars:
            break
        chosen.append(Passage(passage.doc_id, text))
        used += len(text)
    return chosen


def transcript(turns: Sequence[tuple[str, str]]) -> str:
    """``[(role, text), ...]`` as ``Role: text`` lines (roles: system, user, assistant)."""
    lines = []
    for role, text in turns:
        name = ROLE_NAMES.get(role.lower(), role.capitalize())
        lines.append(f"{name}: {text.strip()}")
    return "\n".join(lines)


def grounded_prompt(question: str, passages: Sequence[Passage], history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt of an answer grounded in ``passages`` (already selected), after an
    optional conversation ``history`` of ``(role, text)`` turns."""
    parts = []
    if passages:
        context = "\n".join(f"[{p.doc_id}] {p.text}" for p in passages)
        parts.append(f"Context:\n{context}")
    if history:
        parts.append(f"Conversation:\n{transcript(history)}")
    parts.append(f"Question: {question.strip()}\nAnswer:")
    return "\n\n".join(parts)


def chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt of the assistant's next turn after ``messages`` (``(role, text)`` pairs)."""
    return f"{transcript(messages)}\nAssistant:"


def is_grounded_prompt(text: str) -> bool:
    """Whether ``text`` is already a prompt in :func:`grounded_prompt`'s layout (it ends on
    ``Question: ...\nAnswer:``): such a prompt is read as it is, with no further template."""
    head, sep, tail = text.rpartition("Question: ")
    return bool(sep) and (not head or head.endswith("\n\n")) and tail.endswith("\nAnswer:")


def parse_grounded_prompt(text: str) -> tuple[str, list[Passage]]:
    """``(question, passages)`` of a prompt made by :func:`grounded_prompt` without history
    (its inverse); ``ValueError`` when ``text`` is not one."""
    if not is_grounded_prompt(text):
        raise ValueError("not a grounded prompt (no trailing 'Question: ...\\nAnswer:')")
    head, _, tail = text.rpartition("Question: ")
    question = tail[: -len("\nAnswer:")]
    passages = []
    if head.startswith("Context:\n"):
        for line in head[len("Context:\n") :].rstrip("\n").split("\n"):
            doc_id, sep, body = line.partition("] ")
            if not line.startswith("[") or not sep:
                raise ValueError(f"not a passage line: {line[:60]!r}")
            passages.append(Passage(doc_id[1:], body))
    return question, passages


def cut_at_stop(text: str, stop: Sequence[str] = ANSWER_STOP) -> str:
    """``text`` up to the first stop string, stripped: what the server returns as the answer."""
    for s in stop:
        index = text.find(s)
        if index >= 0:
            text = text[:index]
    return text.strip()
