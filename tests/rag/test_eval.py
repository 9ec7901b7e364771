"""Retrieval metrics: exact numbers on hand-checkable rankings, with real MiniLM and FAISS."""

from __future__ import annotations

import json
import math

import pytest

from src.core.errors import DataError
from src.rag.beir import load_documents, read_beir_corpus, read_beir_qrels
from src.rag.eval import evaluate_rag_pipeline, format_metrics_table, read_eval_queries, retrieval_metrics
from src.rag.retriever import Retriever

INV_LOG2_3 = 1 / math.log2(3)  # DCG discount of rank 2

# Three queries over conftest.TINY_DOCS. The third is judged against 'cats' on purpose:
# the retriever ranks 'dogs' first and 'cats' second, so it tests rank 2 exactly.
EVAL_LINES = [
    {"query": "How do I bake a loaf of bread with yeast?", "relevant_docs": ["bread"]},
    {"query": "Which pets are domesticated animals?", "relevant_docs": ["cats", "dogs"]},
    {"query": "A dog barks and fetches sticks", "relevant_docs": ["cats"]},
]


def test_metrics_of_one_ranking_by_hand():
    m = retrieval_metrics(["a", "x", "b", "y", "c"], {"a": 1, "b": 1, "z": 1}, [1, 3, 5])
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["precision@3"] == pytest.approx(2 / 3)
    assert m["precision@5"] == pytest.approx(2 / 5)
    assert m["hit_rate@1"] == 1.0
    assert m["mrr"] == 1.0
    # DCG@3 = 1 + 1/log2(4) = 1.5; ideal = 1 + 1/log2(3) + 1/log2(4)
    assert m["ndcg@3"] == pytest.approx(1.5 / (1 + INV_LOG2_3 + 0.5))

    miss_first = retrieval_metrics(["x", "y", "a"], {"a": 1}, [1, 3])
    assert miss_first["mrr@1"] == 0.0 and miss_first["mrr"] == pytest.approx(1 / 3)
    assert miss_first["hit_rate@1"] == 0.0 and miss_first["hit_rate@3"] == 1.0
    assert miss_first["ndcg@3"] == pytest.approx(0.5)  # 1/log2(4) over ideal 1
    nothing = retrieval_metrics([], {"a": 1}, [1])
    assert nothing == {"recall@1": 0.0, "precision@1": 0.0, "hit_rate@1": 0.0, "mrr@1": 0.0, "ndcg@1": 0.0, "mrr": 0.0}


def test_graded_ndcg_uses_linear_gains():
    m = retrieval_metrics(["b", "a"], {"a": 2, "b": 1}, [2])
    # DCG = 1 + 2/log2(3); ideal = 2 + 1/log2(3)
    assert m["ndcg@2"] == pytest.approx((1 + 2 * INV_LOG2_3) / (2 + INV_LOG2_3))


def test_evaluate_rag_pipeline_exact_numbers_with_real_minilm(tiny_index, tmp_path):
    eval_file = tmp_path / "rag_eval.jsonl"
    eval_file.write_text("".join(json.dumps(line) + "\n" for line in EVAL_LINES))
    retriever = Retriever(tiny_index)
    # The rankings the numbers below are worked out from.
    rankings = [[r.doc_id for r in results] for results in retriever.search_batch([q["query"] for q in EVAL_LINES], top_k=3)]
    assert rankings[0][0] == "bread"
    assert set(rankings[1][:2]) == {"cats", "dogs"}
    assert rankings[2][:2] == ["dogs", "cats"]

    m = evaluate_rag_pipeline(tiny_index, eval_file, top_k_values=[1, 3, 5])
    assert m["num_queries"] == 3
    assert m["recall@1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["precision@1"] == pytest.approx(2 / 3)
    assert m["precision@3"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 3) / 3)
    assert m["precision@5"] == pytest.approx((1 / 5 + 2 / 5 + 1 / 5) / 3)
    assert m["hit_rate@1"] == pytest.approx(2 / 3)
    assert m["hit_rate@3"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["ndcg@1"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 + INV_LOG2_3) / 3)


def _write_beir(folder, corpus, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")


def test_beir_layout_reads_and_evaluates(tiny_index, tmp_path):
    beir = tmp_path / "tiny-beir"
    corpus = [{"_id": d["id"], "title": d["id"].title(), "text": d["text"]} for d in (
        {"id": "bread", "text": "Mix flour, water and yeast."}, {"id": "cats", "text": "Cats purr."})]
    queries = [{"_id": "q1", "text": EVAL_LINES[0]["query"]}, {"_id": "q2", "text": EVAL_LINES[1]["query"]},
               {"_id": "q3", "text": "not judged relevant to anything"}]
    # q2: graded (dogs 2, cats 1); q3 only has a 0 judgement, so BEIR drops it.
    _write_beir(beir, corpus, queries, [("q1", "bread", 1), ("q2", "dogs", 2), ("q2", "cats", 1), ("q3", "python", 0)])

    docs = read_beir_corpus(beir / "corpus.jsonl")
    assert [d.id for d in docs] == ["bread", "cats"]
    assert docs[0].text == "Bread Mix flour, water and yeast." and docs[0].metadata == {"title": "Bread"}
    assert [d.id for d in load_documents(beir / "corpus.jsonl")] == ["bread", "cats"]
    assert read_beir_qrels(beir / "qrels" / "test.tsv")["q2"] == {"dogs": 2, "cats": 1}
    queries_read = read_eval_queries(beir)
    assert [(q.query_id, q.relevance) for q in queries_read] == [("q1", {"bread": 1}), ("q2", {"dogs": 2, "cats": 1})]

    ranking_q2 = [r.doc_id for r in Retriever(tiny_index).search(EVAL_LINES[1]["query"], top_k=2)]
    m = evaluate_rag_pipeline(tiny_index, beir, top_k_values=[1, 2])
    dcg_q2 = sum({"dogs": 2, "cats": 1}[d] / math.log2(i + 2) for i, d in enumerate(ranking_q2))
    assert m["num_queries"] == 2
    assert m["ndcg@2"] == pytest.approx((1 + dcg_q2 / (2 + INV_LOG2_3)) / 2)
    assert m["recall@2"] == pytest.approx(1.0)


def test_bad_eval_data_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "relevant_docs": ["a"]}\n{"query": "no docs"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: relevant_docs"):
        read_eval_queries(bad)
    with pytest.raises(DataError, match="not found"):
        read_eval_queries(tmp_path / "missing.jsonl")
    beir = tmp_path / "beir"
    _write_beir(beir, [{"_id": "a", "text": "x"}], [{"_id": "q1", "text": "x"}], [("q9", "a", 1)])
    with pytest.raises(DataError, match="not in queries.jsonl") as err:
        read_eval_queries(beir)
    assert "\n" not in str(err.value)


def test_metrics_table_lists_each_mode():
    m = retrieval_metrics(["a"], {"a": 1}, [1, 3])
    table = format_metrics_table({"dense": m, "bm25": m}, [1, 3])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["mode", "recall@1", "recall@3"]
    assert lines[2].startswith("dense") and lines[3].startswith("bm25")
