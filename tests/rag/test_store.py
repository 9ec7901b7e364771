"""ChunkStore: commits, keyword postings, the vector segment and compaction, crash leftovers,
the writer lock, the previous format, and the on-disk IVF path (random vectors, no encoder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from src.core.errors import CheckpointError, ConfigError, DataError, NotTrainedError
from src.rag.store import (
    INDEX_FILE, METADATA_FILE, SEGMENT_IDS_FILE, SEGMENT_VECTORS_FILE, ChunkRecord, ChunkStore, DocumentRecord,
    StoreLockedError, build_ivf_on_disk, is_on_disk, keyword_terms,
)

DIM = 8
SETTINGS = {"embedding_model": "random", "embedding_dim": DIM, "chunking": {"chunk_size": 64, "chunk_overlap": 8}, "index": {"type": "flat"}}
REPO = Path(__file__).resolve().parents[2]


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def doc(doc_id: str, *texts: str, source: str | None = None) -> DocumentRecord:
    meta = {"source": source} if source else {}
    return DocumentRecord(doc_id, meta, f"sha-{doc_id}-{len(texts)}", sum(map(len, texts)), [ChunkRecord(i, t, 0, len(t)) for i, t in enumerate(texts)])


@pytest.fixture
def store(tmp_path):
    s = ChunkStore.create(tmp_path / "idx", SETTINGS)
    yield s
    s.close()


def test_add_get_delete_and_counts(store):
    rng = np.random.default_rng(0)
    ids = store.add([doc("a", "cats purr", "cats sleep"), doc("b", "dogs bark")], unit(rng, 3))
    assert ids == [0, 1, 2] and store.num_documents == 2 and store.num_chunks == 3
    assert store.get_chunks([1])[1]["text"] == "cats sleep" and store.doc_chunk_ids("a") == [0, 1]
    assert dict(store.documents)["b"]["num_chunks"] == 1 and "a" in store.documents
    with pytest.raises(DataError, match="'a' is already in the index"):
        store.add([doc("a", "again")], unit(rng, 1))
    assert store.num_chunks == 3 and store.segment.ntotal == 3  # the failed commit left nothing
    assert store.delete(["a", "nope"]) == 2
    assert store.num_documents == 1 and store.get_chunks([0, 1, 2]).keys() == {2}
    assert store.add([doc("c", "birds sing")], unit(rng, 1)) == [3]  # ids are never reused


def test_keyword_search_reads_postings_and_scores_like_bm25s(store):
    import bm25s

    texts = ["the cat sat on the mat", "a dog and a cat", "dogs bark at night", "the night sky is dark and dark", "stars at night"]
    store.add([doc(f"d{i}", t) for i, t in enumerate(texts)], unit(np.random.default_rng(1), len(texts)))
    bm = bm25s.BM25(k1=1.5, b=0.75)
    bm.index(bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False), show_progress=False)
    for query in ("cat at night", "dark night dark", "dogs"):
        expected = np.asarray(bm.get_scores(bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]))
        got = {cid: s for cid, _, s in store.keyword_search(query, None, 1.5, 0.75)}
        assert set(got) == {i for i in range(len(texts)) if expected[i] > 0}, query
        for cid, score in got.items():
            assert score == pytest.approx(expected[cid], rel=1e-5), query
    assert store.keyword_search("the of and", None, 1.5, 0.75) == []  # stopwords only
    store.delete(["d1"])  # its postings go with it
    assert 1 not in {cid for cid, _, _ in store.keyword_search("cat", None, 1.5, 0.75)}
    assert keyword_terms("The Cat's ok_id X") == ["cat", "ok_id"]


def test_keyword_limit_lengths_blob_and_a_reader_sees_later_chunks(store, tmp_path):
    rng = np.random.default_rng(5)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(40)]
    store.add([doc(f"d{i}", t) for i, t in enumerate(texts[:30])], unit(rng, 30))
    store.compact()  # the lengths blob covers chunks 0..29
    (upto,) = store._one("SELECT upto FROM chunk_lengths")
    assert upto == 30
    reader = ChunkStore.open(tmp_path / "idx")
    full = reader.keyword_search("alpha omega omega", None, 1.5, 0.75)
    # the limit best are the head of the full ranking (ties broken by chunk id), as exact scores
    assert reader.keyword_search("alpha omega omega", 7, 1.5, 0.75) == full[:7]
    assert [s for _, _, s in full] == sorted((s for _, _, s in full), reverse=True)
    by_doc = reader.keyword_search("alpha omega omega", None, 1.5, 0.75, doc_ids=["d3", "d4"])
    assert by_doc == [r for r in full if r[1] in ("d3", "d4")]  # scored from the text: same numbers
    store.add([doc(f"d{i}", t) for i, t in enumerate(texts[30:], start=30)], unit(rng, 10))  # after the blob
    lengths = reader.chunk_lengths(39)
    assert lengths.tolist() == [len(keyword_terms(t)) for t in texts]
    assert {c for c, _, _ in reader.keyword_search("alpha", None, 1.5, 0.75)} == {i for i, t in enumerate(texts) if "alpha" in t}
    reader.close()


def test_reader_memory_maps_vectors_and_survives_a_compaction(store, tmp_path):
    rng = np.random.default_rng(6)
    vectors = unit(rng, 40)
    store.add([doc(f"d{i}", f"text {i}") for i in range(40)], vectors)
    store.compact()
    reader = ChunkStore.open(tmp_path / "idx")
    before = reader.search_vectors(vectors[:3], 5)
    store.delete([f"d{i}" for i in range(20)])
    store.compact()  # a new faiss.index is renamed into place; the reader's mapping is the old file
    after = reader.search_vectors(vectors[:3], 5)
    assert np.array_equal(before[1], after[1]) and np.allclose(reader.vectors([0, 39]), vectors[[0, 39]])
    reader.close()
    fresh = ChunkStore.open(tmp_path / "idx")
    assert fresh.base.ntotal == 20 and set(fresh.search_vectors(vectors[:1], 40)[1][0]) == set(range(20, 40))
    fresh.close()


def test_pq_refine_index_finds_the_exact_top_k_and_reconstructs_exactly(tmp_path):
    dim = 32
    settings = {**SETTINGS, "embedding_dim": dim, "index": {"type": "pq-refine", "pq_m": None, "refine_k_factor": 20}}
    rng = np.random.default_rng(7)
    v = rng.standard_normal((600, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    store = ChunkStore.create(tmp_path / "pq", settings)
    store.add([doc(f"d{i}", f"t{i}") for i in range(400)], v[:400])
    store.compact()  # codebooks trained on the live vectors
    store.add([doc(f"d{i}", f"t{i}") for i in range(400, 600)], v[400:])
    store.delete(["d0", "d1"])
    store.compact()
    store.close()
    reader = ChunkStore.open(tmp_path / "pq")
    inner = faiss.downcast_index(reader.base.index)
    assert isinstance(inner, faiss.IndexRefine) and isinstance(faiss.downcast_index(inner.base_index), faiss.IndexPQFastScan)
    assert reader.base.ntotal == 598
    queries = v[:25]
    sims = queries @ v[2:].T
    exact = np.argsort(-sims, axis=1)[:, :10] + 2
    _, got = reader.search_vectors(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got)]) == 1.0
    assert np.array_equal(reader.vectors([5, 599]), v[[5, 599]])  # re-scoring uses the float32 vectors
    reader.close()
    with pytest.raises(ConfigError, match="index.pq_m: 5 does not divide the embedding dimension 32"):
        ChunkStore.in_memory({**settings, "index": {"type": "pq-refine", "pq_m": 5}})
    tiny = ChunkStore.in_memory(settings)
    with pytest.raises(ConfigError, match="at least 16 chunks"):
        tiny.add([doc("x", "t")], v[:1])


def test_segment_then_compaction_and_reopen(store, tmp_path):
    rng = np.random.default_rng(2)
    vectors = unit(rng, 6)
    store.add([doc(f"d{i}", f"text {i}") for i in range(4)], vectors[:4])
    store.compact()
    assert store.base.ntotal == 4 and store.segment.ntotal == 0
    index_bytes = (store.path / INDEX_FILE).read_bytes()
    store.add([doc("d4", "text 4"), doc("d5", "text 5")], vectors[4:])
    assert (store.path / INDEX_FILE).read_bytes() == index_bytes  # adding appends, faiss.index untouched
    assert (store.path / SEGMENT_IDS_FILE).stat().st_size == 2 * 8
    store.delete(["d0"])
    scores, labels = store.search_vectors(vectors[4:5], 3)
    assert labels[0, 0] == 4 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(store.vectors([1, 5]), vectors[[1, 5]], atol=1e-6)
    store.close()

    reader = ChunkStore.open(tmp_path / "idx")
    assert reader.num_vectors == 6 and reader.num_chunks == 5  # d0's vector waits for a compaction
    np.testing.assert_allclose(reader.vectors([5]), vectors[[5]], atol=1e-6)
    reader.close()
    writer = ChunkStore.open(tmp_path / "idx", writable=True)
    writer.compact()
    assert writer.num_vectors == 5 and not (writer.path / SEGMENT_IDS_FILE).exists()
    manifest = json.loads((writer.path / METADATA_FILE).read_text())
    assert manifest["num_chunks"] == 5 and manifest["segment_rows"] == 0 and manifest["format_version"] == 2
    writer.close()


def test_uncommitted_segment_rows_and_a_half_done_compaction_are_harmless(store, tmp_path):
    rng = np.random.default_rng(3)
    vectors = unit(rng, 3)
    store.add([doc("a", "alpha"), doc("b", "beta")], vectors[:2])
    path = store.path
    # A commit killed after its vectors were appended but before SQLite committed.
    with open(path / SEGMENT_IDS_FILE, "ab") as f:
        f.write(np.array([99], dtype=np.int64).tobytes())
    with open(path / SEGMENT_VECTORS_FILE, "ab") as f:
        f.write(vectors[2].tobytes())
    # A compaction killed after renaming faiss.index but before recording the empty segment.
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    index.add_with_ids(vectors[:2], np.array([0, 1], dtype=np.int64))
    faiss.write_index(index, str(path / INDEX_FILE))
    store.close()

    reopened = ChunkStore.open(path, writable=True)
    assert reopened.segment.ntotal == 2 and (path / SEGMENT_IDS_FILE).stat().st_size == 16  # row 99 cut off
    scores, labels = reopened.search_vectors(vectors[:1], 4)
    assert list(labels[0][:2]) == [0, 1] and -1 in labels[0] or len(set(labels[0][labels[0] >= 0])) == 2  # no duplicates
    reopened.compact()
    assert reopened.num_vectors == 2
    np.testing.assert_allclose(reopened.vectors([0, 1]), vectors[:2], atol=1e-6)
    reopened.close()


def test_second_writer_gets_one_line_and_the_lock_dies_with_its_holder(tmp_path):
    ChunkStore.create(tmp_path / "idx", SETTINGS).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from src.rag.store import ChunkStore
            s = ChunkStore.open({str(tmp_path / 'idx')!r}, writable=True)
            print("ready", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=rf"another writer \(pid {holder.pid}\) is changing this RAG index") as err:
            ChunkStore.open(tmp_path / "idx", writable=True)
        assert "\n" not in str(err.value)
        ChunkStore.open(tmp_path / "idx").close()  # readers are never blocked
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    ChunkStore.open(tmp_path / "idx", writable=True).close()  # a killed writer holds nothing


def test_missing_and_previous_format_indexes_are_one_line_errors(tmp_path):
    with pytest.raises(NotTrainedError, match="mark ingest"):
        ChunkStore.open(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": "mark-rag-index", "format_version": 1, "chunks": []}))
    (tmp_path / INDEX_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match="previous format") as err:
        ChunkStore.open(tmp_path)
    assert "\n" not in str(err.value) and "mark ingest" in str(err.value)


def test_ivf_on_disk_large_corpus_path(tmp_path):
    """IVF trained on a sample, shards built separately and merged into on-disk inverted lists."""
    rng = np.random.default_rng(4)
    vectors = unit(rng, 600)
    settings = {**SETTINGS, "index": {"type": "ivf", "ivf_nlist": 8, "ivf_nprobe": 8, "on_disk": True}}
    store = ChunkStore.create(tmp_path / "big", settings)
    store.add([doc(f"d{i}", f"text {i}") for i in range(600)], vectors)
    build_ivf_on_disk(store, train_sample=400, shard_size=250)  # 3 shards
    assert (tmp_path / "big" / "faiss.ivfdata").is_file() and store.segment.ntotal == 0
    store.close()
    reader = ChunkStore.open(tmp_path / "big")
    ivf = faiss.extract_index_ivf(reader.base)
    assert is_on_disk(ivf) and reader.base.ntotal == 600
    scores, labels = reader.search_vectors(vectors[:20], 1)
    assert list(labels[:, 0]) == list(range(20))  # nprobe = nlist: exact
    np.testing.assert_allclose(reader.vectors([7]), vectors[[7]], atol=1e-6)
    reader.close()
