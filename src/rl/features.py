"""What the retrieval policy observes about a query: cheap, normalised signals of which search will work.

Computed at query time from one dense ranking, one keyword (BM25) ranking and the keyword
index's document frequencies of the query's terms (three calls of the public
:class:`~src.rag.retriever.Retriever` API, milliseconds on a thousand documents), so the
server can run the policy on every ``mode: auto`` request. Each feature is scaled to about
[0, 1] (or a small signed range) by construction; the policy's running observation
normalisation does the rest.

The query and its terms
  ``query_words``       words in the query / 32, capped at 1
  ``query_terms``       keyword terms (stopwords dropped) / 16, capped at 1
  ``idf_mean``          mean BM25 IDF of the terms / the IDF of an unseen term (rare terms: near 1)
  ``idf_max``, ``idf_min``  the rarest and the most common term, same scale
  ``oov_share``         terms the keyword index has never seen / terms (paraphrases and typos)
  ``no_terms``          1 when the query has no keyword term at all (BM25 cannot rank)
What the rankings look like
  ``dense_top1``        cosine of dense search's best document
  ``dense_margin``      top-1 minus top-2 cosine: a clear winner or a close call
  ``dense_spread``      top-1 minus the cosine at depth (10)
  ``bm25_top1``         log(1 + BM25 of the best document) / log(1 + 4 * sum of the terms' IDF)
  ``bm25_margin``       (top-1 - top-2) / top-1 of BM25
  ``bm25_spread``       (top-1 - BM25 at depth) / top-1
  ``bm25_hits``         documents with a BM25 score in the top ``depth`` / depth
How much the two agree
  ``top1_agree``        1 when both put the same document first
  ``overlap_top3``, ``overlap_top10``  shared documents of the two top-k lists / k
  ``dense_first_in_bm25``  1 / BM25's rank of dense's best document (0: not in its top depth)
  ``bm25_first_in_dense``  1 / dense's rank of BM25's best document (0: not in its top depth)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FEATURE_DEPTH = 10  # how deep each ranking is read

FEATURE_NAMES = (
    "query_words", "query_terms", "idf_mean", "idf_max", "idf_min", "oov_share", "no_terms",
    "dense_top1", "dense_margin", "dense_spread",
    "bm25_top1", "bm25_margin", "bm25_spread", "bm25_hits",
    "top1_agree", "overlap_top3", "overlap_top10", "dense_first_in_bm25", "bm25_first_in_dense",
)


def bm25_idf(df: int, units: int) -> float:
    """BM25's (Lucene) IDF of a term found in ``df`` of ``units`` units: ``log(1 + (N - df + 0.5) / (df + 0.5))``."""
    return math.log(1.0 + (units - df + 0.5) / (df + 0.5))


def _inverse_rank(doc_id: str | None, ranking: list[str]) -> float:
    return 1.0 / (ranking.index(doc_id) + 1) if doc_id is not None and doc_id in ranking else 0.0


def features_from_rankings(
    query: str,
    dense: list[tuple[str, float]],
    keyword: list[tuple[str, float]],
    units: int,
    document_frequencies: dict[str, int],
    depth: int = FEATURE_DEPTH,
) -> np.ndarray:
    """The features (``FEATURE_NAMES`` order, float32) from what the retriever returned.

    ``dense`` / ``keyword``: ``(doc_id, score)`` best first, at most ``depth`` each (keyword
    only documents scoring above 0); ``units`` and ``document_frequencies`` as
    :meth:`Retriever.keyword_document_frequencies` gives them. Pure: tested by hand.
    """
    words = len(query.split())
    terms = list(document_frequencies)
    units = max(int(units), 1)
    unseen = bm25_idf(0, units)
    idfs = [bm25_idf(document_frequencies[t], units) / unseen for t in terms]
    oov = sum(1 for t in terms if document_frequencies[t] == 0)

    d_ids, d_scores = [d for d, _ in dense[:depth]], [s for _, s in dense[:depth]]
    k_ids, k_scores = [d for d, _ in keyword[:depth]], [s for _, s in keyword[:depth]]
    d1 = d_scores[0] if d_scores else 0.0
    d2 = d_scores[1] if len(d_scores) > 1 else d1
    dl = d_scores[-1] if d_scores else 0.0
    k1 = k_scores[0] if k_scores else 0.0
    k2 = k_scores[1] if len(k_scores) > 1 else 0.0
    kl = k_scores[-1] if len(k_scores) == depth else 0.0
    idf_sum = sum(bm25_idf(document_frequencies[t], units) for t in terms)
    d_first = d_ids[0] if d_ids else None
    k_first = k_ids[0] if k_ids else None

    values = [
        min(words / 32.0, 1.0),
        min(len(terms) / 16.0, 1.0),
        float(np.mean(idfs)) if idfs else 0.0,
        max(idfs) if idfs else 0.0,
        min(idfs) if idfs else 0.0,
        oov / len(terms) if terms else 0.0,
        float(not terms),
        d1,
        d1 - d2,
        d1 - dl,
        math.log1p(k1) / math.log1p(4.0 * idf_sum) if k1 > 0 and idf_sum > 0 else 0.0,
        (k1 - k2) / k1 if k1 > 0 else 0.0,
        (k1 - kl) / k1 if k1 > 0 else 0.0,
        len(k_ids) / depth,
        float(d_first is not None and d_first == k_first),
        len(set(d_ids[:3]) & set(k_ids[:3])) / 3.0,
        len(set(d_ids[:depth]) & set(k_ids[:depth])) / float(depth),
        _inverse_rank(d_first, k_ids),
        _inverse_rank(k_first, d_ids),
    ]
    return np.asarray(values, dtype=np.float32)


def query_features(retriever: Any, query: str, query_vector: np.ndarray, depth: int = FEATURE_DEPTH) -> np.ndarray:
    """The features of ``query`` over ``retriever``'s index (``query_vector`` from
    ``retriever.embed_queries``): ``(len(FEATURE_NAMES),)`` float32."""
    dense = [(h.doc_id, h.score) for h in retriever.dense_ranking(query_vector, depth)]
    keyword = [(h.doc_id, h.score) for h in retriever.keyword_ranking(query, depth)]
    units, df = retriever.keyword_document_frequencies(query)
    return features_from_rankings(query, dense, keyword, units, df, depth)
