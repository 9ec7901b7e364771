"""src/rl/features.py: each feature against a value computed by hand, and on the real retriever."""

from __future__ import annotations

import math

import numpy as np
import pytest

from src.rl.features import FEATURE_NAMES, bm25_idf, features_from_rankings, query_features


def test_features_by_hand():
    dense = [("a", 0.8), ("b", 0.6), ("c", 0.5), ("d", 0.2)]
    keyword = [("b", 6.0), ("a", 3.0)]
    df = {"parse": 10, "json": 2, "zork": 0}  # zork: not in the index
    f = dict(zip(FEATURE_NAMES, features_from_rankings("how to parse json zork", dense, keyword, 100, df, depth=4)))
    unseen = math.log(1 + 100.5 / 0.5)
    idfs = [math.log(1 + 90.5 / 10.5) / unseen, math.log(1 + 98.5 / 2.5) / unseen, 1.0]
    assert f["query_words"] == pytest.approx(5 / 32)
    assert f["query_terms"] == pytest.approx(3 / 16)
    assert f["idf_mean"] == pytest.approx(np.mean(idfs), rel=1e-5)
    assert f["idf_max"] == pytest.approx(1.0) and f["idf_min"] == pytest.approx(idfs[0], rel=1e-5)
    assert f["oov_share"] == pytest.approx(1 / 3) and f["no_terms"] == 0
    assert f["dense_top1"] == pytest.approx(0.8) and f["dense_margin"] == pytest.approx(0.2) and f["dense_spread"] == pytest.approx(0.6)
    idf_sum = sum(bm25_idf(d, 100) for d in df.values())
    assert f["bm25_top1"] == pytest.approx(math.log(7.0) / math.log(1 + 4 * idf_sum), rel=1e-5)
    assert f["bm25_margin"] == pytest.approx(0.5)
    assert f["bm25_spread"] == pytest.approx(1.0)  # fewer than depth hits: the score at depth is 0, (6 - 0) / 6
    assert f["bm25_hits"] == pytest.approx(2 / 4)
    assert f["top1_agree"] == 0.0
    assert f["overlap_top3"] == pytest.approx(2 / 3) and f["overlap_top10"] == pytest.approx(2 / 4)
    assert f["dense_first_in_bm25"] == pytest.approx(1 / 2) and f["bm25_first_in_dense"] == pytest.approx(1 / 2)


def test_features_without_keyword_terms_or_hits():
    f = dict(zip(FEATURE_NAMES, features_from_rankings("the of and", [("a", 0.3)], [], 50, {})))
    assert f["no_terms"] == 1 and f["idf_mean"] == 0 and f["oov_share"] == 0
    assert f["bm25_top1"] == f["bm25_margin"] == f["bm25_hits"] == f["top1_agree"] == 0
    assert f["dense_top1"] == pytest.approx(0.3) and f["dense_margin"] == 0


def test_query_features_on_the_real_retriever(rl_retriever):
    query = "How do I parse a JSON document into Python objects?"
    vector = rl_retriever.embed_queries([query])[0]
    f = dict(zip(FEATURE_NAMES, query_features(rl_retriever, query, vector)))
    dense = rl_retriever.dense_ranking(vector, 10)
    keyword = rl_retriever.keyword_ranking(query, 10)
    assert f["dense_top1"] == pytest.approx(dense[0].score, abs=1e-6)
    assert f["top1_agree"] == float(dense[0].doc_id == keyword[0].doc_id)
    assert 0 < f["idf_mean"] <= 1 and f["bm25_hits"] == pytest.approx(len(keyword) / 10)
    gibberish = dict(zip(FEATURE_NAMES, query_features(rl_retriever, "qwzx vbnmt", rl_retriever.embed_queries(["qwzx vbnmt"])[0])))
    assert gibberish["oov_share"] == 1.0 and gibberish["bm25_hits"] == 0
