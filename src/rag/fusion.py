"""Fusing a dense and a keyword (BM25) ranking into one: pure scoring functions.

Two fusions, both over documents:

* **RRF** (reciprocal rank fusion, Cormack et al. 2009): ``score(d) = sum over rankings of
  1 / (rrf_k + rank(d))``; ranks only, scores ignored.
* **Convex** fusion of min-max-normalised scores (Bruch et al. 2023; Pyserini's BEIR
  hybrid runs): ``score(d) = w * norm(dense(d)) + (1 - w) * norm(bm25(d))`` with
  ``norm(x) = (x - min) / (max - min)`` over the candidate documents. ``w = 1`` is dense
  order, ``w = 0`` BM25 order (ties broken by the other score), between the two a blend
  that, unlike RRF, knows how far apart the scores are.

Search modes name a convex weight as ``convex-<w>`` (``convex-0.25``); :data:`CONVEX_MODES`
lists those the retriever accepts. Nothing here touches an index: the retriever gives
the scores in, these functions give the order out (tested against hand-computed values).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

CONVEX_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
CONVEX_PREFIX = "convex-"


def convex_mode(weight: float) -> str:
    """The search-mode name of convex fusion with dense weight ``weight`` (``0.25`` -> ``convex-0.25``)."""
    return f"{CONVEX_PREFIX}{weight:g}"


CONVEX_MODES = tuple(convex_mode(w) for w in CONVEX_WEIGHTS)


def convex_weight(mode: str) -> float | None:
    """The dense weight of a ``convex-<w>`` mode name, ``None`` for any other mode."""
    if not mode.startswith(CONVEX_PREFIX):
        return None
    return float(mode[len(CONVEX_PREFIX):])


def min_max_normalise(scores: Mapping[str, float], keys: Iterable[str] | None = None) -> dict[str, float]:
    """``(x - min) / (max - min)`` of each score, over ``keys`` (default: the scored ones).

    A key without a score counts as 0 before normalising (a document BM25 gives no score
    shares no term with the query). When every score is equal, all map to 0 when that
    value is 0 (nothing matched) and to 1 otherwise (all match equally well).
    """
    keys = list(scores if keys is None else keys)
    if not keys:
        return {}
    values = {key: float(scores.get(key, 0.0)) for key in keys}
    low, high = min(values.values()), max(values.values())
    if high == low:
        return {key: (0.0 if high == 0 else 1.0) for key in keys}
    return {key: (value - low) / (high - low) for key, value in values.items()}


def convex_fusion(dense: Mapping[str, float], keyword: Mapping[str, float], weight: float) -> list[tuple[str, float]]:
    """Documents of ``dense`` and ``keyword`` (doc id -> score) ordered by
    ``weight * norm(dense) + (1 - weight) * norm(keyword)``, best first, as ``(doc_id, score)``.

    Both normalisations run over the union of the two dicts' documents (a document missing
    from one counts as 0 there). Ties go to the higher dense score, then to the higher
    keyword score, then to the doc id, so ``weight`` 0 and 1 give exactly BM25's and
    dense's order over the candidates.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"convex fusion weight must be within [0, 1] (got {weight})")
    docs = sorted(set(dense) | set(keyword))
    nd, nk = min_max_normalise(dense, docs), min_max_normalise(keyword, docs)
    fused = {d: weight * nd[d] + (1.0 - weight) * nk[d] for d in docs}
    order = sorted(docs, key=lambda d: (-fused[d], -nd[d] if weight >= 0.5 else -nk[d], -nk[d] if weight >= 0.5 else -nd[d], d))
    return [(d, fused[d]) for d in order]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], rrf_k: int = 60) -> list[tuple[str, float]]:
    """``sum over rankings of 1 / (rrf_k + rank)`` (ranks from 1), best first as ``(doc_id, score)``;
    ties keep the order in which the documents first appear (first ranking first)."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc_id in enumerate(ranking, start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (rrf_k + rank)
    first_seen = {d: i for i, d in enumerate(fused)}
    order = sorted(fused, key=lambda d: (-fused[d], first_seen[d]))
    return [(d, fused[d]) for d in order]
