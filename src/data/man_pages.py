"""Retrieval evaluation corpora from the machine's manual pages (``/usr/share/man``).

A manual page's NAME line (``ls \\- list directory contents``) is a one-line description
written by the page's author; the rest of the page (synopsis, description, options)
answers it. :func:`build_man_page_corpus` turns a set of sections into documents (the
page without its NAME section, roff markup removed, cut at ``max_chars``) and queries
(the NAME description, whose answer is its own page), so retrieval can be measured on
real text with natural questions that are not the Python docstrings of the sample data.

Deterministic: pages are picked by a SHA-256 of their file name, up to ``max_docs``; a
description shared by several pages (an ambiguous question) is left out as a query, and so
is one that names its own command. Used by ``bench/retrieval_policy.py``:

* ``man-commands``: sections 1 and 8 (user and administration commands);
* ``man-system``: sections 2, 3, 5 and 7 without Perl modules (system calls, C library,
  file formats, overviews; mostly the Linux man-pages project).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

MAN_ROOT = Path("/usr/share/man")
MIN_BODY_CHARS = 400
MIN_QUERY_WORDS = 3

_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # strings
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), " "),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^/,%:]"), ""),
    (re.compile(r"\\s[-+]?\d"), ""),
    (re.compile(r"\\(.)"), r"\1"),
]
_SECTION = re.compile(r"^\.S[Hh]\s+(.*)$")


def _plain_line(line: str) -> str:
    for pattern, replacement in _ESCAPES:
        line = pattern.sub(replacement, line)
    return line


def roff_to_sections(source: str) -> list[tuple[str, str]]:
    """``[(SECTION TITLE, plain text)]`` of a roff manual page, in order (text before the first
    ``.SH`` is dropped); macros become plain text or line breaks, comments are removed."""
    sections: list[tuple[str, list[str]]] = []
    for raw in source.splitlines():
        if raw.startswith(('.\\"', "'\\\"", '.\\\'')):
            continue
        header = _SECTION.match(raw)
        if header:
            sections.append((_plain_line(header.group(1)).strip('" ').upper(), []))
            continue
        if not sections:
            continue
        if raw.startswith((".", "'")):
            parts = raw[1:].split(None, 1)
            macro, rest = (parts[0], parts[1] if len(parts) > 1 else "") if parts else ("", "")
            if macro in ("B", "I", "BR", "RB", "BI", "IB", "IR", "RI", "SM", "SB", "SS", "TP", "IP", "Nm", "Nd", "Op", "Ar", "Fl"):
                text = rest.replace('"', "") if macro in ("BR", "RB", "BI", "IB", "IR", "RI") else rest.strip('"')
                sections[-1][1].append(_plain_line(text))
            continue  # layout macros (.PP, .nf, .RS, ...) carry no text
        sections[-1][1].append(_plain_line(raw))
    return [(title, " ".join(" ".join(lines).split())) for title, lines in sections]


def read_man_page(path: Path) -> tuple[str, str] | None:
    """``(description, body)`` of a (gzipped) manual page, or ``None`` when it is a redirect
    (``.so``), has no ``NAME`` section with a ``\\-`` description, or too little text."""
    try:
        raw = gzip.open(path, "rt", encoding="utf-8", errors="replace").read() if path.suffix == ".gz" else path.read_text(errors="replace")
    except (OSError, EOFError):
        return None
    if raw.lstrip().startswith(".so "):
        return None
    sections = roff_to_sections(raw)
    name = next((text for title, text in sections if title == "NAME"), "")
    if " - " not in name:
        return None
    description = name.split(" - ", 1)[1].strip().rstrip(".")
    body = "\n\n".join(f"{title}\n{text}" for title, text in sections if title != "NAME" and text)
    if len(body) < MIN_BODY_CHARS:
        return None
    return description, body


def _page_name(path: Path) -> str:
    return path.name.removesuffix(".gz").rsplit(".", 1)[0]


def build_man_page_corpus(
    sections: Sequence[str], max_docs: int = 1000, max_chars: int = 3000, root: Path = MAN_ROOT, exclude_suffixes: Sequence[str] = ("pm", "perl"),
    exclude_prefixes: Sequence[str] = ("gcloud",),
) -> tuple[list[dict], list[dict]]:
    """``(documents, queries)`` from the pages of ``sections`` (``["1", "8"]``) under ``root``.

    Documents are ``{id: "<name>.<section>", text, metadata: {source, section}}`` (body cut at
    ``max_chars`` on a word boundary), queries ``{query, relevant_docs: [id], source}``.
    Pages whose file name ends in one of ``exclude_suffixes`` (``ls.3pm``) or starts with one of
    ``exclude_prefixes`` (the Google Cloud SDK's thousands of near-identical pages) are skipped.
    """
    paths = []
    for section in sections:
        folder = root / f"man{section}"
        if folder.is_dir():
            paths += [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(tuple(exclude_prefixes))
                      and not p.name.removesuffix(".gz").endswith(tuple(exclude_suffixes))]
    paths.sort(key=lambda p: (hashlib.sha256(p.name.encode()).hexdigest(), p.name))
    documents, described = [], []
    for path in paths:
        if len(documents) >= max_docs:
            break
        page = read_man_page(path)
        if page is None:
            continue
        description, body = page
        doc_id = path.name.removesuffix(".gz")
        text = body if len(body) <= max_chars else body[:max_chars].rsplit(None, 1)[0]
        documents.append({"id": doc_id, "text": text, "metadata": {"source": str(path), "section": path.parent.name}})
        described.append((doc_id, _page_name(path), description))
    counts: dict[str, int] = {}
    for _, _, description in described:
        counts[description.lower()] = counts.get(description.lower(), 0) + 1
    queries = [
        {"query": description, "relevant_docs": [doc_id], "source": doc_id}
        for doc_id, name, description in described
        if counts[description.lower()] == 1 and len(description.split()) >= MIN_QUERY_WORDS
        and not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", description, re.IGNORECASE)
    ]
    return documents, queries


def write_corpus(folder: Path, documents: Sequence[dict], queries: Sequence[dict]) -> dict[str, Path]:
    """``documents.jsonl`` and ``rag_eval.jsonl`` in ``folder`` (MARK's readers' formats)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"documents": folder / "documents.jsonl", "rag_eval": folder / "rag_eval.jsonl"}
    for key, records in (("documents", documents), ("rag_eval", queries)):
        paths[key].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return paths
