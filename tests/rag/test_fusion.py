"""src/rag/fusion.py against values computed by hand, and the fused modes of the real retriever."""

from __future__ import annotations

import pytest

from src.rag.fusion import CONVEX_MODES, convex_fusion, convex_mode, convex_weight, min_max_normalise, reciprocal_rank_fusion
from src.rag.retriever import Retriever


def test_min_max_normalise_by_hand():
    # (x - 1) / (5 - 1): 1 -> 0, 3 -> 0.5, 5 -> 1; a missing key counts as 0 -> (0 - 0) / (5 - 0)
    assert min_max_normalise({"a": 1.0, "b": 3.0, "c": 5.0}) == {"a": 0.0, "b": 0.5, "c": 1.0}
    assert min_max_normalise({"a": 2.5, "b": 5.0}, ["a", "b", "z"]) == {"a": 0.5, "b": 1.0, "z": 0.0}
    assert min_max_normalise({"a": 2.0, "b": 2.0}) == {"a": 1.0, "b": 1.0}
    assert min_max_normalise({}, ["a", "b"]) == {"a": 0.0, "b": 0.0}
    assert min_max_normalise({}) == {}


def test_convex_fusion_by_hand():
    dense = {"a": 0.9, "b": 0.5, "c": 0.7}      # d is missing: 0
    keyword = {"b": 12.0, "c": 6.0, "d": 3.0}   # a is missing: 0; norm: a 0, b 1, c 0.5, d 0.25
    # dense over the union {a,b,c,d} with d missing (0): min 0, max 0.9 -> a 1, b 5/9, c 7/9, d 0
    fused = dict(convex_fusion(dense, keyword, 0.5))
    assert fused["a"] == pytest.approx(0.5 * 1 + 0.5 * 0)
    assert fused["b"] == pytest.approx(0.5 * 5 / 9 + 0.5 * 1)
    assert fused["c"] == pytest.approx(0.5 * 7 / 9 + 0.5 * 0.5)
    assert fused["d"] == pytest.approx(0.5 * 0 + 0.5 * 0.25)
    assert [d for d, _ in convex_fusion(dense, keyword, 0.5)] == ["b", "c", "a", "d"]
    quarter = dict(convex_fusion(dense, keyword, 0.25))
    assert quarter["c"] == pytest.approx(0.25 * 7 / 9 + 0.75 * 0.5)
    # weight 1 / 0: exactly dense's / BM25's order, ties broken by the other score
    assert [d for d, _ in convex_fusion(dense, keyword, 1.0)] == ["a", "c", "b", "d"]
    assert [d for d, _ in convex_fusion(dense, keyword, 0.0)] == ["b", "c", "d", "a"]
    with pytest.raises(ValueError, match="within"):
        convex_fusion(dense, keyword, 1.5)


def test_reciprocal_rank_fusion_by_hand():
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["b", "d"]], rrf_k=60))
    assert fused["a"] == pytest.approx(1 / 61)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 63)
    assert fused["d"] == pytest.approx(1 / 62)
    # c and d... d (1/62) before c (1/63); a tie keeps first appearance
    assert [d for d, _ in reciprocal_rank_fusion([["a", "b", "c"], ["b", "d"]], 60)] == ["b", "a", "d", "c"]
    assert [d for d, _ in reciprocal_rank_fusion([["x"], ["y"]], 1)] == ["x", "y"]


def test_convex_mode_names():
    assert CONVEX_MODES == ("convex-0", "convex-0.25", "convex-0.5", "convex-0.75", "convex-1")
    assert convex_mode(0.75) == "convex-0.75" and convex_weight("convex-0.75") == 0.75
    assert convex_weight("hybrid") is None


def test_retriever_convex_modes_match_fusion_of_its_own_scores(tiny_index):
    retriever = Retriever(tiny_index)
    query = "a dog barks at the cat"
    vector = retriever.embed_queries([query])[0]
    docs = list(tiny_index.documents)
    dense = {d: s.score for d, s in retriever.dense_scores(vector, docs).items()}
    keyword = {d: s.score for d, s in retriever.keyword_scores(query, docs).items()}
    assert set(keyword) == {"cats", "dogs"}  # the only documents sharing a term
    for mode in CONVEX_MODES:
        got = [(r.doc_id, r.score) for r in retriever.search(query, top_k=5, mode=mode, query_vector=vector)]
        want = convex_fusion(dense, keyword, convex_weight(mode))
        assert [d for d, _ in got] == [d for d, _ in want]
        # float32 cosines from FAISS and from numpy sum in different orders (and CPUs round differently);
        # min-max normalisation divides that difference by the score range: 1e-6 relative is too tight
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-5, abs=1e-6)
    dense_order = [r.doc_id for r in retriever.search(query, top_k=5, mode="dense", query_vector=vector)]
    assert [r.doc_id for r in retriever.search(query, 5, "convex-1", vector)] == dense_order
    assert [r.doc_id for r in retriever.search(query, 2, "convex-0", vector)] == [h.doc_id for h in retriever.keyword_ranking(query, 2)]


def test_keyword_ranking_scores_and_document_frequencies(tiny_index):
    retriever = Retriever(tiny_index)
    ranking = retriever.keyword_ranking("dog barks loudly", 5)
    assert [h.doc_id for h in ranking] == ["dogs"] and ranking[0].score > 0
    assert retriever.keyword_scores("dog barks", ["cats", "dogs"]).keys() == {"dogs"}
    units, df = retriever.keyword_document_frequencies("the domesticated dog zyzzyva")
    assert units == tiny_index.num_chunks == 5
    assert df == {"domesticated": 2, "dog": 1, "zyzzyva": 0}  # "the" is a stopword
