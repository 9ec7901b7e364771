"""The knowledge base as the Knowledge tab uses it: the RAG index the server searches.

Files and folders are added through :func:`src.rag.ingest.ingest` (what ``mark ingest``
runs: one reader per format, incremental, ``sync`` deletes the documents of files that are
gone), documents are deleted through a writable :class:`~src.rag.indexer.RagIndex`, and
search goes through ``ModelService.search``, the call behind the API's ``/rag-search``.
After a change the model service's loaded :class:`~src.rag.retriever.Retriever` reopens the
index (reusing its embedding model), so the next Chat answer finds the new documents.
"""

from __future__ import annotations

import html
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

from src.board.paths import PathGuard
from src.core.errors import DataError
from src.rag.indexer import RagIndex
from src.rag.ingest import ingest

_WORD = re.compile(r"[A-Za-z0-9]{3,}")
_STOPWORDS = {"the", "and", "for", "are", "what", "how", "does", "with", "that", "this", "from", "which", "who", "why", "when", "was", "were"}


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

    def _reopen(self) -> None:
        """The served retriever reads the index as it now is on disk."""
        retriever = self.retriever
        old = retriever.index
        retriever.index = RagIndex.load(self.index_dir, encoder=old.encoder, batch_size=old.batch_size)
        old.close()

    def add(self, path: str | Path, sync: bool = False) -> dict[str, Any]:
        """Ingest ``path`` (a file or folder inside the allowed roots) with ``mark ingest``'s
        function: new documents added, changed ones re-embedded; with ``sync``, documents of
        files that are gone are deleted. Returns the counts and the skipped files."""
        target = self.guard.resolve(path, must_exist=True, what="documents path")
        with self._lock:
            report = ingest([target], self.index_dir, sync=sync, encoder=self.retriever.index.encoder)
            self._reopen()
        return {
            "added": report.added, "updated": report.updated, "deleted": report.deleted, "unchanged": report.unchanged,
            "chunks_added": report.embedded_chunks, "skipped": list(report.skipped_files),
        }

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Delete documents by id (an unknown id is a ``DataError``); returns chunks removed."""
        ids = [d.strip() for d in doc_ids if d and d.strip()]
        if not ids:
            raise DataError("no document id given")
        with self._lock:
            index = RagIndex.load(self.index_dir, encoder=self.retriever.index.encoder, writable=True)
            try:
                removed = index.delete_documents(ids)
                index.save(self.index_dir)
            finally:
                index.close()
            self._reopen()
        return removed

    def documents(self, limit: int = 500) -> list[list[Any]]:
        """Rows ``[doc id, source, chunks, characters]`` of the first ``limit`` documents."""
        rows = []
        for doc_id, info in list(self.retriever.index.documents.items())[:limit]:
            meta = info.get("metadata") or {}
            rows.append([doc_id, meta.get("source", meta.get("title", "")), info.get("num_chunks"), info.get("num_chars")])
        return rows

    def chunks(self, doc_id: str) -> list[dict[str, Any]]:
        """The chunks of one document in order (``chunk_index``, ``start_char``, ``end_char``, ``text``, ...)."""
        index = self.retriever.index
        if doc_id not in index.documents:
            raise DataError(f"document '{doc_id}' is not in the index")
        found = index.get_chunks(index.doc_chunk_ids(doc_id))
        return sorted(found.values(), key=lambda c: c["chunk_index"])

    async def search(self, query: str, mode: str, top_k: int) -> list[dict[str, Any]]:
        """Hits of ``query`` as the API's ``/rag-search`` finds them, with the matched text highlighted."""
        if not query.strip():
            raise DataError("empty query")
        used, hits, strategy = await self.service.search(query, top_k, mode)
        return [
            {
                "mode": used, "strategy": strategy,  # strategy: the retrieval policy's choice in mode auto
                "rank": h.rank, "doc_id": h.doc_id, "source": (h.metadata or {}).get("source", (h.metadata or {}).get("title", "")),
                "score": round(float(h.score), 4), "dense_score": h.dense_score, "bm25_score": h.bm25_score,
                "text": h.text, "highlighted": highlight(h.text, query),
            }
            for h in hits
        ]
