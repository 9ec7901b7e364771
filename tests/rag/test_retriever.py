"""Retriever: dense, BM25 and hybrid search with per-document aggregation; load_rag_index."""

from __future__ import annotations

import numpy as np
import pytest

from src.core.errors import ConfigError, NotTrainedError
from src.core.config import save_config
from src.rag.beir import load_documents
from src.rag.config import RagConfig, RagIndexConfig, RagRetrievalConfig
from src.rag.indexer import RagIndex
from src.rag.load import load_rag_index
from src.rag.retriever import Retriever


@pytest.fixture(scope="module")
def subset_index(encoder, sample_subset_dir) -> RagIndex:
    """Real sample documents of several chunks each (small chunks, to have many)."""
    index = RagIndex(encoder, RagIndexConfig(), chunk_size=96, chunk_overlap=16)
    index.add_documents(load_documents(sample_subset_dir / "documents.jsonl"))
    return index


def test_embed_queries_are_normalised(tiny_index):
    vectors = Retriever(tiny_index).embed_queries(["one query", "another query"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_dense_search_scores_are_cosines(tiny_index):
    retriever = Retriever(tiny_index)
    query = "How do I bake a loaf of bread with yeast?"
    results = retriever.search(query, top_k=5, mode="dense")
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]
    assert results[0].doc_id == "bread" and results[0].metadata == {"topic": "food"}
    q = retriever.embed_queries([query])[0]
    for r in results:
        expected = float(tiny_index.chunk_vectors([r.chunk_id])[0] @ q)
        assert r.score == pytest.approx(expected, abs=1e-5) and r.dense_score == pytest.approx(expected, abs=1e-5)
        assert r.bm25_score is None
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)


def test_bm25_and_hybrid_modes(tiny_index):
    retriever = Retriever(tiny_index)
    bm25 = retriever.search("Which pets are domesticated animals?", top_k=5, mode="bm25")
    # Only 'cats' and 'dogs' contain a query term ('domesticated'); the others score 0 and are left out.
    assert {r.doc_id for r in bm25} == {"cats", "dogs"} and all(r.score > 0 for r in bm25)
    assert bm25[0].score == pytest.approx(bm25[1].score)  # same term, same length class
    assert retriever.search("the of and", top_k=3, mode="bm25") == []  # stopwords only

    hybrid = retriever.search("A dog barks and fetches sticks", top_k=3, mode="hybrid")
    # 'dogs' is first in both rankings: 2 / (60 + 1); 'cats' is 2nd by dense only: 1 / (60 + 2)
    assert [r.doc_id for r in hybrid[:2]] == ["dogs", "cats"]
    assert hybrid[0].score == pytest.approx(2 / 61) and hybrid[1].score == pytest.approx(1 / 62)
    assert hybrid[0].dense_score > 0.5 and hybrid[0].bm25_score > 0 and hybrid[1].bm25_score == 0.0


def test_all_scores_fills_dense_and_bm25(tiny_index):
    results = Retriever(tiny_index).search("What does magma do when it erupts?", top_k=5, mode="dense", all_scores=True)
    assert results[0].doc_id == "volcano" and results[0].bm25_score > 0
    assert all(r.dense_score is not None and r.bm25_score is not None for r in results)


def test_mode_and_top_k_default_to_config_and_bad_mode_is_an_error(tiny_index):
    retriever = Retriever(tiny_index, RagRetrievalConfig(mode="bm25", top_k=1))
    results = retriever.search("How do I bake a loaf of bread with yeast?")
    assert len(results) == 1 and results[0].bm25_score is not None and results[0].dense_score is None
    with pytest.raises(ConfigError, match="search mode 'sparse'"):
        retriever.search("bread", mode="sparse")


def test_chunk_hits_are_aggregated_per_document(subset_index):
    assert subset_index.num_chunks > 3 * len(subset_index.documents)  # many chunks per document
    retriever = Retriever(subset_index)
    for mode in ("dense", "bm25", "hybrid"):
        results = retriever.search("How do I compute a hash digest of data?", top_k=8, mode=mode)
        ids = [r.doc_id for r in results]
        assert len(ids) == len(set(ids)) == 8, mode
        assert "hashlib" in ids[:3], (mode, ids)
    # The result's dense score is the best of its chunks.
    q = retriever.embed_queries(["How do I compute a hash digest of data?"])[0]
    top = retriever.search("", top_k=1, mode="dense", query_vector=q)[0]
    chunk_scores = subset_index.chunk_vectors(subset_index.doc_chunk_ids(top.doc_id)) @ q
    assert top.score == pytest.approx(float(chunk_scores.max()), abs=1e-5)
    chunk = subset_index.get_chunk(top.chunk_id)
    assert top.text == chunk["text"] and (top.start_char, top.end_char) == (chunk["start_char"], chunk["end_char"])


def test_load_rag_index_uses_the_saved_retrieval_config(tiny_index, tmp_path, sample_subset_dir):
    with pytest.raises(NotTrainedError):
        load_rag_index(tmp_path / "empty", device="cpu")
    tiny_index.save(tmp_path)
    cfg = RagConfig(data={"documents_file": sample_subset_dir / "documents.jsonl"}, retrieval={"mode": "hybrid", "top_k": 2})
    save_config(cfg, tmp_path / "config.yaml")
    retriever = load_rag_index(tmp_path, device="cpu")
    assert retriever.config.mode == "hybrid" and retriever.config.top_k == 2
    results = retriever.search("Which pets are domesticated animals?")
    assert {r.doc_id for r in results} == {"cats", "dogs"}
    assert all(r.dense_score is not None and r.bm25_score is not None for r in results)


def test_score_documents_gives_dense_and_bm25_per_document(tiny_index):
    retriever = Retriever(tiny_index)
    query = "A dog barks and fetches sticks"
    scores = retriever.score_documents(query, ["dogs", "cats", "unknown"])
    assert set(scores) == {"dogs", "cats"}
    q = retriever.embed_queries([query])[0]
    dense_dogs = float(tiny_index.chunk_vectors(tiny_index.doc_chunk_ids("dogs"))[0] @ q)
    assert scores["dogs"][0] == pytest.approx(dense_dogs, abs=1e-5)
    assert scores["dogs"][1] > 0 and scores["cats"][1] == 0.0
    assert scores["dogs"][1] == pytest.approx(retriever.search(query, top_k=1, mode="bm25")[0].score)


def test_keyword_ranking_and_scores(tiny_index):
    retriever = Retriever(tiny_index)
    ranking = retriever.keyword_ranking("Which pets are domesticated animals?", 5)
    assert {s.doc_id for s in ranking} == {"cats", "dogs"} and all(s.score > 0 for s in ranking)
    scores = retriever.keyword_scores("A dog barks and fetches sticks", ["dogs", "cats", "bread"])
    assert set(scores) == {"dogs"}  # documents scoring 0 are left out
    assert scores["dogs"].score == pytest.approx(retriever.keyword_ranking("A dog barks and fetches sticks", 1)[0].score)
    assert retriever.keyword_ranking("the of and", 5) == []


def test_results_carry_heading_path_and_source(encoder):
    index = RagIndex(encoder, RagIndexConfig(), chunk_size=64, chunk_overlap=8)
    index.add_documents([{"id": "guide/install.md", "text": "Install the package with pip.", "metadata": {"source": "guide/install.md"}}])
    hit = Retriever(index).search("install with pip", top_k=1, mode="hybrid")[0]
    assert hit.source == "guide/install.md" and hit.heading_path == [] and hit.to_dict()["source"] == "guide/install.md"
