"""MARK's RAG index as a LangChain retriever."""

from __future__ import annotations

import threading
from typing import Any, Optional

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field


class MARKRetriever(BaseRetriever):
    """Searches a MARK :class:`~src.rag.retriever.Retriever` (dense, BM25 or hybrid).

    Each result is a LangChain ``Document`` whose ``page_content`` is the document's
    best-matching chunk and whose metadata holds ``doc_id``, ``score``, ``rank``,
    ``chunk_index`` and the document's own metadata. ``lock`` is shared with whoever adds
    documents to the index, so a search never sees a half-added document.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Any = Field(description="a src.rag.retriever.Retriever")
    top_k: int = Field(4, ge=1)
    mode: Optional[str] = Field(None, description="dense | bm25 | hybrid (default: the index's config)")
    lock: Any = Field(default_factory=threading.RLock, exclude=True)

    def search(self, query: str, top_k: int | None = None) -> list[Document]:
        """The ``top_k`` best documents for ``query`` (default: this retriever's ``top_k``)."""
        with self.lock:
            hits = self.retriever.search(query, top_k or self.top_k, self.mode)
        return [
            Document(
                page_content=hit.text,
                metadata={
                    **hit.metadata,
                    "doc_id": hit.doc_id,
                    "score": hit.score,
                    "rank": hit.rank,
                    "chunk_index": hit.chunk_index,
                    "heading_path": hit.heading_path,
                    "source": hit.source,
                },
            )
            for hit in hits
        ]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return self.search(query)
