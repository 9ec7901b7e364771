"""Search a :class:`~src.rag.indexer.RagIndex`: dense, BM25, or both fused (RRF or convex).

Every ranking is over documents: a document's score is its best chunk's score (MaxP),
and the result carries that chunk's text. Modes:

* ``dense``: cosine similarity of the query embedding with the chunk embeddings (FAISS).
* ``bm25``: BM25 (the ``bm25s`` library) over the chunk texts; documents with no query
  term score 0 and are not returned.
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

import threading

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
    ``text`` is the best chunk, found at ``start_char:end_char`` of the document.
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
        self._bm25 = None
        self._bm25_df: dict[str, int] = {}
        self._bm25_version = -1
        self._bm25_lock = threading.Lock()  # a server may search from several threads

    # ----------------------------------------------------------------- queries
    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """Query embeddings, ``(len(queries), dim)`` float32, L2-normalised (the index's model)."""
        return self.index.encoder.encode(list(queries), batch_size=self.index.batch_size)

    # ----------------------------------------------------------------- dense
    def dense_ranking(self, query_vector: np.ndarray, depth: int) -> list[DocScore]:
        """Top ``depth`` documents by best-chunk cosine (fewer if the index has fewer)."""
        num_docs = sum(1 for ids in self.index.doc_chunk_ids.values() if ids)
        depth = min(depth, num_docs)
        if depth <= 0:
            return []
        # Several chunks of one document can crowd the top: widen the chunk search
        # until it covers ``depth`` distinct documents or the whole index.
        k = max(4 * depth, 32)
        while True:
            scores, ids = self.index.search_vectors(query_vector, k)
            best: dict[str, DocScore] = {}
            for score, chunk_id in zip(scores[0], ids[0]):
                if chunk_id < 0:
                    continue
                doc_id = self.index.chunks[chunk_id]["doc_id"]
                if doc_id not in best:  # FAISS returns chunks best first
                    best[doc_id] = DocScore(doc_id, float(score), int(chunk_id))
            if len(best) >= depth or k >= self.index.num_chunks:
                return list(best.values())[:depth]
            k *= 2

    def dense_scores(self, query_vector: np.ndarray, doc_ids: list[str]) -> dict[str, DocScore]:
        """Exact best-chunk cosine of the query with each of ``doc_ids`` (from stored vectors)."""
        query_vector = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        out: dict[str, DocScore] = {}
        for doc_id in doc_ids:
            chunk_ids = self.index.doc_chunk_ids.get(doc_id) or []
            if not chunk_ids:
                continue
            sims = self.index.chunk_vectors(chunk_ids) @ query_vector
            best = int(np.argmax(sims))
            out[doc_id] = DocScore(doc_id, float(sims[best]), chunk_ids[best])
        return out

    # ----------------------------------------------------------------- BM25
    def _bm25_index(self):
        """The BM25 index of the chunk texts, rebuilt when the index has changed."""
        import bm25s

        with self._bm25_lock:
            if self._bm25 is None or self._bm25_version != self.index.version:
                texts = [chunk["text"] for chunk in self.index.chunks]
                bm25 = bm25s.BM25(k1=self.config.bm25_k1, b=self.config.bm25_b)
                df: dict[str, int] = {}
                if texts:
                    tokens = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
                    bm25.index(tokens, show_progress=False)
                    for chunk_tokens in tokens:
                        for term in set(chunk_tokens):
                            df[term] = df.get(term, 0) + 1
                self._bm25, self._bm25_df, self._bm25_version = bm25, df, self.index.version
            return self._bm25

    def bm25_chunk_scores(self, query: str) -> np.ndarray:
        """BM25 score of ``query`` for every chunk, ``(num_chunks,)`` float32."""
        import bm25s

        bm25 = self._bm25_index()
        query_tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        if not query_tokens or self.index.num_chunks == 0:
            return np.zeros(self.index.num_chunks, dtype=np.float32)
        return np.asarray(bm25.get_scores(query_tokens), dtype=np.float32)

    def bm25_doc_scores(self, chunk_scores: np.ndarray) -> dict[str, DocScore]:
        """Best-chunk BM25 score of every document (from :meth:`bm25_chunk_scores`)."""
        out: dict[str, DocScore] = {}
        for doc_id, chunk_ids in self.index.doc_chunk_ids.items():
            if chunk_ids:
                best = chunk_ids[int(np.argmax(chunk_scores[chunk_ids]))]
                out[doc_id] = DocScore(doc_id, float(chunk_scores[best]), best)
        return out

    @staticmethod
    def bm25_ranking(doc_scores: dict[str, DocScore], depth: int) -> list[DocScore]:
        """Top ``depth`` documents by BM25; documents scoring 0 (no query term) are left out."""
        hits = [s for s in doc_scores.values() if s.score > 0]
        hits.sort(key=lambda s: -s.score)
        return hits[:depth]

    def keyword_ranking(self, query: str, depth: int) -> list[DocScore]:
        """Top ``depth`` documents by best-chunk BM25; only documents scoring above 0."""
        return self.bm25_ranking(self.bm25_doc_scores(self.bm25_chunk_scores(query)), depth)

    def keyword_scores(self, query: str, doc_ids: list[str]) -> dict[str, DocScore]:
        """Best-chunk BM25 of ``query`` for each of ``doc_ids``; documents scoring 0 are omitted."""
        scores = self.bm25_doc_scores(self.bm25_chunk_scores(query))
        return {d: scores[d] for d in doc_ids if d in scores and scores[d].score > 0}

    def keyword_document_frequencies(self, query: str) -> tuple[int, dict[str, int]]:
        """``(units, {term: df})``: how many units (chunks) the keyword index holds, and for each
        of ``query``'s terms (the index's own tokenisation, stopwords dropped) in how many of
        them it occurs (0: not in the index's vocabulary). Enough for IDF and OOV statistics."""
        import bm25s

        self._bm25_index()
        terms = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        return self.index.num_chunks, {t: self._bm25_df.get(t, 0) for t in dict.fromkeys(terms)}

    def score_documents(
        self, query: str, doc_ids: list[str], query_vector: np.ndarray | None = None
    ) -> dict[str, tuple[float, float]]:
        """``{doc_id: (dense_score, bm25_score)}`` of ``query`` for the given documents (best chunk each)."""
        if query_vector is None:
            query_vector = self.embed_queries([query])[0]
        dense = self.dense_scores(query_vector, doc_ids)
        sparse = self.bm25_doc_scores(self.bm25_chunk_scores(query))
        return {d: (dense[d].score, sparse[d].score) for d in doc_ids if d in dense}

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

        bm25_docs = self.bm25_doc_scores(self.bm25_chunk_scores(query)) if need_bm25 else {}
        if mode == "dense":
            ranked = [(s.doc_id, s.score, s.chunk_id) for s in self.dense_ranking(query_vector, top_k)]
        elif mode == "bm25":
            ranked = [(s.doc_id, s.score, s.chunk_id) for s in self.bm25_ranking(bm25_docs, top_k)]
        else:
            depth = max(self.config.candidates, top_k)
            dense = self.dense_ranking(query_vector, depth)
            sparse = self.bm25_ranking(bm25_docs, depth)
            best_chunk = {hit.doc_id: hit.chunk_id for hit in reversed(sparse)}
            best_chunk.update({hit.doc_id: hit.chunk_id for hit in dense})  # prefer the dense passage
            weight = convex_weight(mode)
            if weight is None:
                fused = reciprocal_rank_fusion([[h.doc_id for h in dense], [h.doc_id for h in sparse]], self.config.rrf_k)
            else:  # exact scores of every candidate in both rankings, then normalise and blend
                candidates = list(best_chunk)
                dense_all = {d: s.score for d, s in self.dense_scores(query_vector, candidates).items()}
                keyword_all = {d: bm25_docs[d].score for d in candidates if d in bm25_docs and bm25_docs[d].score > 0}
                fused = convex_fusion(dense_all, keyword_all, weight)
            ranked = [(doc_id, score, best_chunk[doc_id]) for doc_id, score in fused[:top_k]]

        dense_docs = self.dense_scores(query_vector, [d for d, _, _ in ranked]) if need_dense else {}
        results = []
        for rank, (doc_id, score, chunk_id) in enumerate(ranked, start=1):
            chunk = self.index.chunks[chunk_id]
            results.append(
                SearchResult(
                    doc_id=doc_id,
                    score=float(score),
                    rank=rank,
                    text=chunk["text"],
                    metadata=dict(self.index.documents[doc_id].get("metadata") or {}),
                    chunk_id=chunk_id,
                    chunk_index=chunk["chunk_index"],
                    start_char=chunk["start_char"],
                    end_char=chunk["end_char"],
                    dense_score=dense_docs[doc_id].score if doc_id in dense_docs else None,
                    bm25_score=bm25_docs[doc_id].score if doc_id in bm25_docs else None,
                )
            )
        return results

    def search_batch(
        self, queries: list[str], top_k: int | None = None, mode: SearchMode | None = None, all_scores: bool = False
    ) -> list[list[SearchResult]]:
        """:meth:`search` for many queries, embedding them in one batch."""
        mode = mode or self.config.mode
        vectors = self.embed_queries(queries) if (mode != "bm25" or all_scores) else [None] * len(queries)
        return [self.search(q, top_k, mode, v, all_scores) for q, v in zip(queries, vectors)]
