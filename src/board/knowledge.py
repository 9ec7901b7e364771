"""The knowledge base as the Knowledge tab uses it: the RAG index the server searches.

It works on the :class:`~src.rag.retriever.Retriever` that the model service has loaded
(``ModelService.retriever()``), so a document added here is found by the next Chat answer
without a reload, and writes the index back to its folder (``RagIndex.save``) after each
change. Search goes through ``ModelService.search``, the call behind the API's
``/rag-search``.

Files become documents by :func:`read_files`: a ``.jsonl`` file holds MARK documents
(``{id, text, metadata}``, ``src.data.readers``), any other text file (``.txt``, ``.md``,
...) is one document whose id is its path below the folder it was added from. Each document
remembers that folder (``metadata.source_root``) and its path (``metadata.source``), so
:meth:`KnowledgeBase.add` with ``sync=True`` also deletes the documents of that folder whose
file has gone.
"""

from __future__ import annotations

import html
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from src.board.paths import PathGuard
from src.core.errors import DataError
from src.data.readers import Document, read_documents
from src.rag.indexer import document_hash

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
_WORD = re.compile(r"[A-Za-z0-9]{3,}")
_STOPWORDS = {"the", "and", "for", "are", "what", "how", "does", "with", "that", "this", "from", "which", "who", "why", "when", "was", "were"}


@dataclass
class SourceDocuments:
    """The documents read from one folder (or the files given directly)."""

    root: Path
    documents: list[Document]
    skipped: list[tuple[str, str]]


def read_files(path: Path) -> SourceDocuments:
    """The documents of a file or of every supported file below a folder; files that are
    not text are listed in ``skipped`` with the reason (never silently dropped)."""
    root = path if path.is_dir() else path.parent
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    documents: list[Document] = []
    skipped: list[tuple[str, str]] = []
    for file in files:
        rel = file.relative_to(root).as_posix()
        meta = {"source": rel, "source_root": str(root)}
        if file.suffix.lower() == ".jsonl":
            try:
                documents += [Document(id=d.id, text=d.text, metadata={**d.metadata, **meta}) for d in read_documents(file)]
            except DataError as err:
                skipped.append((rel, str(err)))
        elif file.suffix.lower() in TEXT_SUFFIXES:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                skipped.append((rel, "not UTF-8 text"))
                continue
            if not text.strip():
                skipped.append((rel, "empty"))
                continue
            documents.append(Document(id=rel, text=text, metadata={**meta, "title": file.stem}))
        else:
            skipped.append((rel, f"unsupported file type '{file.suffix or file.name}' (supported: .jsonl, {', '.join(sorted(TEXT_SUFFIXES))})"))
    return SourceDocuments(root, documents, skipped)


def store_uploads(files: Sequence[str | Path], upload_dir: Path, max_bytes: int) -> list[Path]:
    """Copy uploaded files (the browser's temporary copies) into ``upload_dir``; a file over
    ``max_bytes`` is a ``DataError`` and nothing is copied."""
    sources = [Path(f) for f in files]
    for source in sources:
        size = source.stat().st_size
        if size > max_bytes:
            raise DataError(f"{source.name}: {size:,} bytes is over the upload limit of {max_bytes:,} bytes")
    upload_dir.mkdir(parents=True, exist_ok=True)
    stored = []
    for source in sources:
        target = upload_dir / Path(source.name).name
        shutil.copyfile(source, target)
        stored.append(target)
    return stored


def query_terms(query: str) -> list[str]:
    """The words of ``query`` worth highlighting (3+ letters, not stop words)."""
    return [w for w in dict.fromkeys(m.lower() for m in _WORD.findall(query)) if w not in _STOPWORDS]


def highlight(text: str, query: str) -> str:
    """``text`` as HTML with each query term wrapped in ``<mark>``."""
    escaped = html.escape(text)
    terms = query_terms(query)
    if not terms:
        return escaped
    pattern = re.compile(r"\b(" + "|".join(re.escape(t) for t in terms) + r")", re.IGNORECASE)
    return pattern.sub(r"<mark>\1</mark>", escaped)


class KnowledgeBase:
    """Add, sync, delete, browse and search the served RAG index (see the module docstring)."""

    def __init__(self, service, guard: PathGuard) -> None:
        self.service = service
        self.guard = guard
        self._lock = threading.Lock()

    @property
    def retriever(self):
        return self.service.retriever()

    @property
    def index_dir(self) -> Path:
        return self.service.registry.model_path("rag")

    def info(self) -> dict[str, Any]:
        """The index's size and settings."""
        retriever = self.retriever
        index = retriever.index
        return {
            "folder": str(self.index_dir),
            "documents": len(index.documents),
            "chunks": index.num_chunks,
            "embedding_model": index.encoder.name,
            "embedding_dim": index.dim,
            "chunk_size": index.chunk_size,
            "chunk_overlap": index.chunk_overlap,
            "index_type": index.index_config.type,
            "search_mode": retriever.config.mode,
            "top_k": retriever.config.top_k,
        }

    def add(self, path: str | Path, sync: bool = False) -> dict[str, Any]:
        """Index the documents of ``path`` (a file or folder inside the allowed roots): new
        ids are added, changed ones re-embedded; with ``sync``, documents earlier added from
        the same folder whose file is gone are deleted. Returns the counts and skipped files."""
        source = read_files(self.guard.resolve(path, must_exist=True, what="documents path"))
        index = self.retriever.index
        with self._lock:
            wanted = {doc.id: doc for doc in source.documents}
            known = index.documents
            new = [d for d in source.documents if d.id not in known]
            changed = [d for d in source.documents if d.id in known and known[d.id]["sha256"] != document_hash(d)]
            gone = []
            if sync:
                root = str(source.root)
                gone = [doc_id for doc_id, info in known.items()
                        if (info.get("metadata") or {}).get("source_root") == root and doc_id not in wanted]
            if changed or gone:
                index.delete_documents([d.id for d in changed] + gone)
            added_chunks = index.add_documents(new + changed) if new or changed else 0
            if new or changed or gone:
                index.save(self.index_dir)
        return {
            "added": len(new), "updated": len(changed), "deleted": len(gone),
            "unchanged": len(source.documents) - len(new) - len(changed), "chunks_added": added_chunks,
            "skipped": source.skipped,
        }

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Delete documents by id (an unknown id is a ``DataError``); returns chunks removed."""
        ids = [d.strip() for d in doc_ids if d and d.strip()]
        if not ids:
            raise DataError("no document id given")
        with self._lock:
            removed = self.retriever.index.delete_documents(ids)
            self.retriever.index.save(self.index_dir)
        return removed

    def documents(self, limit: int = 500) -> list[list[Any]]:
        """Rows ``[doc id, source, chunks, characters]`` of the first ``limit`` documents."""
        rows = []
        for doc_id, info in list(self.retriever.index.documents.items())[:limit]:
            meta = info.get("metadata") or {}
            rows.append([doc_id, meta.get("source", meta.get("title", "")), info.get("num_chunks"), info.get("num_chars")])
        return rows

    def chunks(self, doc_id: str) -> list[dict[str, Any]]:
        """The chunks of one document in order (``chunk_index``, ``start_char``, ``end_char``, ``text``)."""
        index = self.retriever.index
        if doc_id not in index.documents:
            raise DataError(f"document '{doc_id}' is not in the index")
        return [dict(index.chunks[i]) for i in index.doc_chunk_ids.get(doc_id, [])]

    async def search(self, query: str, mode: str, top_k: int) -> list[dict[str, Any]]:
        """Hits of ``query`` as the API's ``/rag-search`` finds them, with the matched text highlighted."""
        if not query.strip():
            raise DataError("empty query")
        _, hits = await self.service.search(query, top_k, mode)
        return [
            {
                "rank": h.rank, "doc_id": h.doc_id, "source": (h.metadata or {}).get("source", (h.metadata or {}).get("title", "")),
                "score": round(float(h.score), 4), "dense_score": h.dense_score, "bm25_score": h.bm25_score,
                "text": h.text, "highlighted": highlight(h.text, query),
            }
            for h in hits
        ]
