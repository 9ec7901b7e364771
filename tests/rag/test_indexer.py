"""RagIndex: build, add without re-embedding, delete, save/load, and one-line errors on mismatch."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from src.core.errors import CheckpointError, ConfigError, DataError, NotTrainedError
from src.rag.config import RagIndexConfig
from src.rag.indexer import INDEX_FILE, METADATA_FILE, STORE_FILE, RagIndex
from src.rag.retriever import Retriever


def test_build_stores_normalised_vectors_and_metadata(tiny_index, encoder, tiny_docs):
    assert tiny_index.num_chunks == 5 and tiny_index.num_vectors == 5
    vectors = tiny_index.chunk_vectors(range(5))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[3], encoder.encode([tiny_docs[3]["text"]])[0], atol=1e-5)
    chunk = tiny_index.get_chunk(3)
    assert chunk["doc_id"] == "bread" and chunk["text"] == tiny_docs[3]["text"] and chunk["heading_path"] == []
    assert tiny_index.documents["bread"]["metadata"] == {"topic": "food"}
    assert list(tiny_index.documents) == ["cats", "dogs", "python", "bread", "volcano"]


def test_add_embeds_only_new_documents(tiny_index, count_encoded):
    before = tiny_index.corpus_checksum
    added = tiny_index.add_documents([{"id": "moon", "text": "The moon orbits the earth and causes the tides."}])
    assert added == 1 and count_encoded == ["The moon orbits the earth and causes the tides."]
    assert tiny_index.num_chunks == 6 and tiny_index.corpus_checksum != before
    assert Retriever(tiny_index).search("What causes ocean tides?", top_k=1)[0].doc_id == "moon"
    with pytest.raises(DataError, match="already in the index"):
        tiny_index.add_documents([{"id": "cats", "text": "again"}])
    tiny_index.delete_documents(["moon"])
    assert tiny_index.corpus_checksum == before  # the checksum depends on the documents only


def test_delete_keeps_the_other_vectors_and_compaction_drops_the_dead_ones(tiny_index, count_encoded):
    kept_vectors = tiny_index.chunk_vectors([0, 2, 3, 4])
    removed = tiny_index.delete_documents(["dogs"])
    assert removed == 1 and count_encoded == []  # nothing re-embedded
    assert tiny_index.num_chunks == 4 and tiny_index.doc_chunk_ids("dogs") == []
    assert "dogs" not in {r.doc_id for r in Retriever(tiny_index).search("A dog barks", top_k=5)}
    tiny_index.compact()
    assert tiny_index.num_vectors == 4
    np.testing.assert_array_equal(tiny_index.chunk_vectors([0, 2, 3, 4]), kept_vectors)
    with pytest.raises(DataError, match="not in the index: dogs"):
        tiny_index.delete_documents(["dogs"])


def test_sync_re_embeds_only_changed_and_new(tiny_index, count_encoded, tiny_docs):
    docs = [dict(d) for d in tiny_docs if d["id"] != "python"]
    docs[0] = {**docs[0], "text": "Cats are independent pets that purr."}
    docs.append({"id": "moon", "text": "The moon orbits the earth."})
    changes = tiny_index.sync_documents(docs)
    assert changes == {"added": 1, "updated": 1, "deleted": 1, "unchanged": 3}
    assert sorted(count_encoded) == sorted(["Cats are independent pets that purr.", "The moon orbits the earth."])
    assert set(tiny_index.documents) == {"cats", "dogs", "bread", "volcano", "moon"}
    assert tiny_index.sync_documents(docs) == {"added": 0, "updated": 0, "deleted": 0, "unchanged": 5}


def test_save_load_roundtrip(tiny_index, encoder, tmp_path):
    paths = tiny_index.save(tmp_path)
    assert paths["faiss_index"].name == INDEX_FILE and paths["metadata"].name == METADATA_FILE and paths["store"].name == STORE_FILE
    meta = json.loads(paths["metadata"].read_text())
    assert meta["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["format_version"] == 2
    assert meta["embedding_dim"] == 384 and meta["normalized"] is True and meta["index"] == {"type": "flat"}
    assert meta["corpus_checksum"] == tiny_index.corpus_checksum and meta["num_chunks"] == 5 and "chunks" not in meta
    assert meta["chunking"]["chunk_size"] == 64 and len(meta["faiss_index_sha256"]) == 64

    loaded = RagIndex.load(tmp_path, encoder=encoder)
    np.testing.assert_array_equal(loaded.chunk_vectors(range(5)), tiny_index.chunk_vectors(range(5)))
    assert loaded.get_chunks(range(5)) == tiny_index.get_chunks(range(5))
    assert dict(loaded.documents.items()) == dict(tiny_index.documents.items())
    assert (loaded.chunk_size, loaded.chunk_overlap) == (64, 8)
    query = "Which pets are domesticated animals?"
    before = [(r.doc_id, round(r.score, 5)) for r in Retriever(tiny_index).search(query, top_k=5)]
    assert [(r.doc_id, round(r.score, 5)) for r in Retriever(loaded).search(query, top_k=5)] == before

    # Changing an index opened read-only changes a copy in memory, never the folder.
    loaded.add_documents([{"id": "moon", "text": "The moon orbits the earth."}])
    assert "moon" in loaded.documents and "moon" not in RagIndex.load(tmp_path, encoder=encoder).documents


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_indexes_build_delete_and_reload(index_type, encoder, tmp_path):
    docs = [{"id": f"d{i}", "text": f"Document number {i} talks about topic {i % 7} and item {i * 13}."} for i in range(40)]
    config = RagIndexConfig(type=index_type, ivf_nlist=4, ivf_nprobe=4, hnsw_m=8)
    index = RagIndex(encoder, config, chunk_size=32, chunk_overlap=4)
    index.add_documents(docs[:30])
    index.add_documents(docs[30:])  # IVF: added to the cells trained on the first 30
    assert index.num_chunks == 40
    query = docs[17]["text"]
    assert Retriever(index).search(query, top_k=1)[0].doc_id == "d17"
    index.delete_documents(["d17", "d3"])
    assert "d17" not in {r.doc_id for r in Retriever(index).search(query, top_k=5)}
    index.save(tmp_path)
    loaded = RagIndex.load(tmp_path, encoder=encoder)
    assert loaded.num_vectors == 38 and loaded.index_config.type == index_type
    live = [i for i in range(40) if i not in (3, 17)]
    np.testing.assert_array_equal(loaded.chunk_vectors(live), index.chunk_vectors(live))


def test_ivf_needs_enough_chunks_to_train(encoder, tiny_docs):
    index = RagIndex(encoder, RagIndexConfig(type="ivf", ivf_nlist=100), chunk_size=32, chunk_overlap=4)
    with pytest.raises(ConfigError, match="need at least 100 chunks"):
        index.add_documents(tiny_docs)


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_load_refuses_mismatches_with_one_line_errors(tiny_index, encoder, tmp_path, tiny_docs):
    with pytest.raises(NotTrainedError, match="train_rag_indexer"):
        RagIndex.load(tmp_path / "nothing", encoder=encoder)

    tiny_index.save(tmp_path / "a")
    with pytest.raises(CheckpointError, match="built with embedding model 'sentence-transformers/all-MiniLM-L6-v2', not 'bert-base-uncased'") as err:
        RagIndex.load(tmp_path / "a", embedding_model="bert-base-uncased", encoder=encoder)
    _one_line(err)
    with pytest.raises(CheckpointError, match="dimension 384, not 768") as err:
        RagIndex.load(tmp_path / "a", embedding_dim=768, encoder=encoder)
    _one_line(err)
    # The alias of the same weights is accepted.
    RagIndex.load(tmp_path / "a", embedding_model="minilm-local", embedding_dim=384, encoder=encoder)

    # metadata.json of another build next to this store
    other = RagIndex(encoder, RagIndexConfig(), chunk_size=64, chunk_overlap=8)
    other.add_documents(tiny_docs[:2])
    other.save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / METADATA_FILE, tmp_path / "a" / METADATA_FILE)
    with pytest.raises(CheckpointError, match="does not match") as err:
        RagIndex.load(tmp_path / "a", encoder=encoder)
    _one_line(err)

    # faiss.index of another build (fewer vectors than the store committed)
    tiny_index.save(tmp_path / "c")
    shutil.copy(tmp_path / "b" / INDEX_FILE, tmp_path / "c" / INDEX_FILE)
    with pytest.raises(CheckpointError, match="holds 2 vectors, the store expects 5") as err:
        RagIndex.load(tmp_path / "c", encoder=encoder)
    _one_line(err)

    (tmp_path / "c" / METADATA_FILE).write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        RagIndex.load(tmp_path / "c", encoder=encoder)
    (tmp_path / "b" / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match="faiss.index: missing"):
        RagIndex.load(tmp_path / "b", encoder=encoder)


def test_an_index_of_the_previous_format_is_refused_with_how_to_rebuild(encoder, tmp_path):
    """The format before the store: faiss.index + one metadata.json holding every chunk."""
    (tmp_path / INDEX_FILE).write_bytes(b"old")
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": "mark-rag-index", "format_version": 1, "chunks": [], "documents": {}}))
    with pytest.raises(CheckpointError, match="previous format .* rebuild it with `mark ingest") as err:
        RagIndex.load(tmp_path, encoder=encoder)
    _one_line(err)


def test_bf16_embedding_precision_is_kept_by_the_index(encoder, tiny_docs, tmp_path):
    """``model.embedding_precision: bf16``: documents embedded within 1e-3 cosine of fp32, the
    same rankings, queries still in fp32 (bit for bit), the precision stored with the index and
    kept after a reload; an encoder asked explicitly for another precision is refused, ``auto``
    adopts the index's."""
    bf16 = encoder.with_precision("bf16")
    assert bf16.model is encoder.model and encoder.precision == "fp32"
    texts = [d["text"] for d in tiny_docs]
    as_documents = bf16.encode(texts, documents=True)
    cosines = (encoder.encode(texts) * as_documents).sum(axis=1)
    assert cosines.min() > 0.999 and cosines.max() < 1.0 - 1e-7 and as_documents.dtype == np.float32
    np.testing.assert_array_equal(bf16.encode(texts), encoder.encode(texts))  # queries: fp32

    index = RagIndex(bf16, RagIndexConfig(type="flat"), chunk_size=64, chunk_overlap=8)
    index.add_documents(tiny_docs)
    assert index.store.settings["embedding_precision"] == "bf16"
    index.save(tmp_path / "idx")
    reloaded = RagIndex.load(tmp_path / "idx", device="cpu")
    assert reloaded.encoder.precision == "bf16" and json.loads((tmp_path / "idx" / METADATA_FILE).read_text())["embedding_precision"] == "bf16"
    query = "Which animal purrs and hunts mice?"
    assert [r.doc_id for r in Retriever(reloaded).search(query, top_k=5)] == [r.doc_id for r in Retriever(index).search(query, top_k=5)]
    assert Retriever(reloaded).search(query, top_k=1)[0].doc_id == "cats"

    with pytest.raises(CheckpointError, match="embedding_precision=bf16, the encoder runs fp32"):
        RagIndex.load(tmp_path / "idx", encoder=encoder)
    auto = copy.copy(encoder)
    auto.requested_precision = "auto"
    assert RagIndex.load(tmp_path / "idx", encoder=auto).encoder.precision == "bf16"
