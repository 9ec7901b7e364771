"""Search a :class:`~src.rag.indexer.RagIndex`: dense, BM25, or both fused (RRF or convex).

Every ranking is over documents: a document's score is its best chunk's score (MaxP),
and the result carries that chunk's text. Modes:

* ``dense``: cosine similarity of the query embedding with the chunk embeddings (FAISS).
* ``bm25``: BM25 over the chunk texts, read from the store's persisted keyword index
  (scored as the ``bm25s`` library does, see :mod:`src.rag.store`); documents with no
  query term score 0 and are not returned.
* ``hybrid``: reciprocal rank fusion of the two rankings,
  ``score = sum over rankings of 1 / (rrf_k + rank)``, each ranking cut at ``candidates``.
* ``convex-<w>`` (``w`` in 0, 0.25, 0.5, 0.75, 1): ``w * norm(dense) + (1 - w) * norm(bm25)``
  with min-max normalisation over the union of the two rankings cut at ``candidates``
  (exact scores of every candidate in both), see :mod:`src.rag.fusion`.

Other components (RL environment, API server) open an index with :func:`load_rag_index`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from src.core.errors import ConfigError
from src.rag.config import RagRetrievalConfig, SearchMode
from src.rag.fusion import CONVEX_MODES, convex_fusion, convex_weight, reciprocal_rank_fusion
from src.rag.indexer import RagIndex

SEARCH_MODES = ("dense", "bm25", "hybrid", *CONVEX_MODES)


@dataclass
class SearchResult:
    """One retrieved document.

    ``score`` ranks the results of the mode used (cosine for dense, BM25 for bm25, RRF for
    hybrid). ``dense_score`` / ``bm25_score`` are the document's own dense and BM25 scores
    (best chunk), filled when the mode computed them or ``all_scores=True``, else ``None``.
    ``text`` is the best chunk, found at ``start_char:end_char`` of the document, under the
    headings ``heading_path``; ``source`` is the file it came from (``None`` if unknown).
    """

    doc_id: str
    score: float
    rank: int
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    chunk_id: int = -1
    chunk_index: int = 0
    start_char: int = 0
    end_char: int = 0
    dense_score: float | None = None
    bm25_score: float | None = None
    heading_path: list[str] = field(default_factory=list)
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DocScore:
    """A document's score in one ranking and the chunk that gave it."""

    doc_id: str
    score: float
    chunk_id: int


class Retriever:
    """Document search over a ``RagIndex``; defaults come from ``config`` (the ``retrieval`` section)."""

    def __init__(self, index: RagIndex, config: RagRetrievalConfig | None = None) -> None:
        self.index = index
        self.config = config or RagRetrievalConfig()

    # ----------------------------------------------------------------- queries
    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """Query embeddings, ``(len(queries), dim)`` float32, L2-normalised (the index's model)."""
        return self.index.encoder.encode(list(queries), batch_size=self.index.batch_size)

    # ----------------------------------------------------------------- dense
    def dense_ranking(self, query_vector: np.ndarray, depth: int) -> list[DocScore]:
        """Top ``depth`` documents by best-chunk cosine (fewer if the index has fewer)."""
        depth = min(depth, len(self.index.documents))
        if depth <= 0:
            return []
        # Several chunks of one document can crowd the top (and deleted chunks' vectors wait
        # for a compaction): widen the chunk search until it covers ``depth`` documents.
        k = max(4 * depth, 32)
        while True:
            scores, ids = self.index.search_vectors(query_vector, k)
            doc_of = self.index.store.chunk_doc_ids([int(i) for i in ids[0] if i >= 0])
            best: dict[str, DocScore] = {}
            for score, chunk_id in zip(scores[0], ids[0]):
                doc_id = doc_of.get(int(chunk_id))
                if doc_id is not None and doc_id not in best:  # FAISS returns chunks best first
                    best[doc_id] = DocScore(doc_id, float(score), int(chunk_id))
            if len(best) >= depth or k >= self.index.num_vectors:
                return list(best.values())[:depth]
            k *= 2

    def dense_scores(self, query_vector: np.ndarray, doc_ids: list[str]) -> dict[str, DocScore]:
        """Exact best-chunk cosine of the query with each of ``doc_ids`` (from stored vectors)."""
        query_vector = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        chunks_of = self.index.store.chunk_ids_of(list(doc_ids))
        all_ids = [c for d in doc_ids if d in chunks_of for c in chunks_of[d]]
        sims_of = dict(zip(all_ids, (self.index.chunk_vectors(all_ids) @ query_vector).tolist())) if all_ids else {}
        out: dict[str, DocScore] = {}
        for doc_id in doc_ids:
            chunk_ids = chunks_of.get(doc_id)
            if not chunk_ids:
                continue
            best = chunk_ids[int(np.argmax([sims_of[c] for c in chunk_ids]))]
            out[doc_id] = DocScore(doc_id, float(sims_of[best]), best)
        return out

    # ----------------------------------------------------------------- keywords (BM25)
    def keyword_ranking(self, query: str, depth: int) -> list[DocScore]:
        """Top ``depth`` documents by best-chunk BM25; only documents with a score > 0.

        Reads the postings of the query's terms in the store's keyword index; the best
        ``max(200, 8 * depth)`` chunks are scored exactly (every matching chunk when
        ``depth`` covers all documents).
        """
        if depth <= 0:
            return []
        limit = None if depth >= len(self.index.documents) else max(8 * depth, 200)
        hits = self.index.store.keyword_search(query, limit, self.config.bm25_k1, self.config.bm25_b)
        best: dict[str, DocScore] = {}
        for chunk_id, doc_id, score in hits:  # best first
            if doc_id not in best:
                best[doc_id] = DocScore(doc_id, score, chunk_id)
        return list(best.values())[:depth]

    def keyword_scores(self, query: str, doc_ids: list[str]) -> dict[str, DocScore]:
        """Exact best-chunk BM25 of ``query`` for each of ``doc_ids`` (documents scoring 0 are left out)."""
        hits = self.index.store.keyword_search(query, None, self.config.bm25_k1, self.config.bm25_b, doc_ids=list(doc_ids))
        best: dict[str, DocScore] = {}
        for chunk_id, doc_id, score in hits:
            if doc_id not in best:
                best[doc_id] = DocScore(doc_id, score, chunk_id)
        return best

    def keyword_document_frequencies(self, query: str) -> tuple[int, dict[str, int]]:
        """``(units, {term: df})``: how many units (chunks) the keyword index holds, and for each
        of ``query``'s terms (the index's own tokenisation, stopwords dropped) in how many of
        them it occurs (0: not in the index's vocabulary), read from the store's keyword index.
        Enough for IDF and OOV statistics."""
        from src.rag.store import keyword_terms

        return self.index.num_chunks, self.index.store.document_frequencies(keyword_terms(query))

    def score_documents(
        self, query: str, doc_ids: list[str], query_vector: np.ndarray | None = None
    ) -> dict[str, tuple[float, float]]:
        """``{doc_id: (dense_score, bm25_score)}`` of ``query`` for the given documents (best chunk each)."""
        if query_vector is None:
            query_vector = self.embed_queries([query])[0]
        dense = self.dense_scores(query_vector, doc_ids)
        sparse = self.keyword_scores(query, [d for d in doc_ids if d in dense])
        return {d: (dense[d].score, sparse[d].score if d in sparse else 0.0) for d in doc_ids if d in dense}

    # ----------------------------------------------------------------- search
    def search(
        self,
        query: str,
        top_k: int | None = None,
        mode: SearchMode | None = None,
        query_vector: np.ndarray | None = None,
        all_scores: bool = False,
    ) -> list[SearchResult]:
        """The ``top_k`` best documents for ``query``, best first.

        ``mode`` (``dense`` | ``bm25`` | ``hybrid`` | ``convex-<w>``) and ``top_k`` default to the config.
        ``query_vector`` reuses an embedding from :meth:`embed_queries`. With
        ``all_scores=True`` every result carries both its dense and its BM25 score.
        """
        mode = mode or self.config.mode
        if mode not in SEARCH_MODES:
            raise ConfigError(f"search mode '{mode}': expected one of {', '.join(SEARCH_MODES)}")
        top_k = top_k or self.config.top_k
        if top_k <= 0:
            raise ConfigError(f"top_k must be positive (got {top_k})")
        need_dense = mode != "bm25" or all_scores
        need_bm25 = mode != "dense" or all_scores
        if need_dense and query_vector is None:
            query_vector = self.embed_queries([query])[0]

        if mode == "dense":
            ranked = [(s.doc_id, s.score, s.chunk_id) for s in self.dense_ranking(query_vector, top_k)]
        elif mode == "bm25":
            ranked = [(s.doc_id, s.score, s.chunk_id) for s in self.keyword_ranking(query, top_k)]
        else:
            depth = max(self.config.candidates, top_k)
            dense = self.dense_ranking(query_vector, depth)
            sparse = self.keyword_ranking(query, depth)
            best_chunk = {hit.doc_id: hit.chunk_id for hit in reversed(sparse)}
            best_chunk.update({hit.doc_id: hit.chunk_id for hit in dense})  # prefer the dense passage
            weight = convex_weight(mode)
            if weight is None:
                fused = reciprocal_rank_fusion([[h.doc_id for h in dense], [h.doc_id for h in sparse]], self.config.rrf_k)
            else:  # exact scores of every candidate in both rankings, then normalise and blend
                candidates = list(best_chunk)
                dense_all = {d: s.score for d, s in self.dense_scores(query_vector, candidates).items()}
                keyword_all = {d: s.score for d, s in self.keyword_scores(query, candidates).items()}
                fused = convex_fusion(dense_all, keyword_all, weight)
            ranked = [(doc_id, score, best_chunk[doc_id]) for doc_id, score in fused[:top_k]]

        doc_ids = [d for d, _, _ in ranked]
        dense_docs = self.dense_scores(query_vector, doc_ids) if need_dense else {}
        if mode == "bm25":
            bm25_docs = {d: DocScore(d, score, c) for d, score, c in ranked}
        else:
            bm25_docs = self.keyword_scores(query, doc_ids) if need_bm25 else {}
        chunks = self.index.get_chunks(c for _, _, c in ranked)
        results = []
        for rank, (doc_id, score, chunk_id) in enumerate(ranked, start=1):
            chunk = chunks[chunk_id]
            metadata = dict(self.index.documents[doc_id].get("metadata") or {})
            results.append(
                SearchResult(
                    doc_id=doc_id,
                    score=float(score),
                    rank=rank,
                    text=chunk["text"],
                    metadata=metadata,
                    chunk_id=chunk_id,
                    chunk_index=chunk["chunk_index"],
                    start_char=chunk["start_char"],
                    end_char=chunk["end_char"],
                    dense_score=dense_docs[doc_id].score if doc_id in dense_docs else None,
                    bm25_score=(bm25_docs[doc_id].score if doc_id in bm25_docs else 0.0) if need_bm25 else None,
                    heading_path=list(chunk.get("heading_path") or []),
                    source=metadata.get("source"),
                )
            )
        return results

    def search_batch(
        self, queries: list[str], top_k: int | None = None, mode: SearchMode | None = None, all_scores: bool = False,
        query_vectors: np.ndarray | None = None,
    ) -> list[list[SearchResult]]:
        """:meth:`search` for many queries, embedding them in one batch (``query_vectors``: already embedded)."""
        mode = mode or self.config.mode
        if query_vectors is not None:
            vectors = query_vectors
        else:
            vectors = self.embed_queries(queries) if (mode != "bm25" or all_scores) else [None] * len(queries)
        return [self.search(q, top_k, mode, v, all_scores) for q, v in zip(queries, vectors)]
