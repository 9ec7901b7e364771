"""The Knowledge tab's functions on a copy of the tiny RAG index: info, add / sync (``ingest``) / delete,
browse chunks, search with highlighted matches, refused paths, the upload limit."""

import asyncio
from pathlib import Path

import pytest

from src.board.knowledge import highlight, store_uploads
from src.board.paths import PathRefusedError
from src.core.errors import DataError
from src.rag.load import load_rag_index


def test_add_search_browse_sync_and_delete(workspace, board_project: Path) -> None:
    kb = workspace.knowledge
    before = kb.info()
    assert before["documents"] == 12 and before["chunks"] >= 12 and before["embedding_dim"] == 384

    docs = board_project / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "guide" / "zebra.md").write_text("# Zebra\n\nThe zebra crossing protocol forwards flamingo packets to the gateway.\n")
    (docs / "notes.txt").write_text("Quarterly notes: the pelican cache evicts entries after ninety seconds.")
    (docs / "image.png").write_bytes(b"\x89PNG\r\n")
    counts = kb.add(docs)
    assert (counts["added"], counts["updated"], counts["deleted"]) == (2, 0, 0)
    assert kb.info()["documents"] == 14 and "image.png" not in kb.info()  # no reader for .png

    hits = asyncio.run(kb.search("flamingo packets", "bm25", 3))
    assert hits[0]["doc_id"] == "guide/zebra.md" and hits[0]["source"] == "guide/zebra.md" and hits[0]["score"] > 0
    assert "<mark>flamingo</mark> <mark>packets</mark>" in hits[0]["highlighted"]
    dense = asyncio.run(kb.search("pelican cache eviction", "dense", 3))
    assert dense[0]["doc_id"] == "notes.txt" and 0 < dense[0]["score"] <= 1
    hybrid = asyncio.run(kb.search("zebra crossing protocol", "hybrid", 5))
    assert hybrid[0]["doc_id"] == "guide/zebra.md" and hybrid[0]["dense_score"] is not None and hybrid[0]["bm25_score"] > 0

    chunks = kb.chunks("guide/zebra.md")
    assert len(chunks) == 1 and "flamingo" in chunks[0]["text"] and chunks[0]["start_char"] == 0

    # The index on disk changed too: a fresh load finds the new document.
    assert "notes.txt" in load_rag_index(workspace.checkpoints_dir / "rag", device="cpu").index.documents

    assert kb.delete(["guide/zebra.md"]) >= 1 and kb.info()["documents"] == 13
    assert all(hit["doc_id"] != "guide/zebra.md" for hit in asyncio.run(kb.search("flamingo packets", "bm25", 3)))
    with pytest.raises(DataError, match="not in the index"):
        kb.delete(["guide/zebra.md"])

    # Sync (mark ingest --sync): the index holds exactly the files of this folder afterwards.
    (docs / "notes.txt").write_text("Quarterly notes, revised: the pelican cache now evicts after sixty seconds.")
    counts = kb.add(docs, sync=True)
    assert (counts["added"], counts["updated"], counts["deleted"]) == (0, 1, 12)
    assert kb.info()["documents"] == 1 and kb.chunks("notes.txt")[0]["text"].startswith("Quarterly notes, revised")
    with pytest.raises(PathRefusedError):
        kb.add("/etc")


def test_uploads_have_a_size_limit_and_text_is_read(tmp_path: Path) -> None:
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("a small file")
    big.write_text("x" * 5000)
    with pytest.raises(DataError, match="over the upload limit of 4,096 bytes"):
        store_uploads([small, big], tmp_path / "uploads", 4096)
    assert not (tmp_path / "uploads").exists()
    stored = store_uploads([small], tmp_path / "uploads", 4096)
    assert [p.name for p in stored] == ["small.txt"]
    assert stored[0].read_text() == "a small file"
    assert highlight("Zebras <b>cross</b> roads", "zebras cross?") == "<mark>Zebras</mark> &lt;b&gt;<mark>cross</mark>&lt;/b&gt; roads"
