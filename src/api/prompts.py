"""The text MARK's language models read for a grounded answer or a chat, in one place.

The server's ``/query`` and ``/v1/chat/completions`` and the LangChain graph all build
their prompts here, so a model sees the same layout whichever way it is called. The
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
