"""The Ray engine (src/rag/ray_engine.py) on a real local 2-CPU Ray cluster gives the local engine's chunks and vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from src.data.files import iter_source_files
from src.rag.config import RagConfig
from src.rag.indexer import RagIndex
from src.rag.ingest import ingest
from src.rag.ray_engine import connect, process_sources_with_ray, read_and_chunk

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _folder(root, pdf_writer):
    (root / "guide").mkdir(parents=True)
    (root / "guide" / "install.md").write_text(
        "# Install\n\n" + "Run the installer from a fresh shell and wait. " * 12 + "\n\n## From source\n\nClone, then build it.\n"
    )
    (root / "guide" / "faq.html").write_text(
        "<html><head><title>FAQ</title></head><body><nav>Home | Docs</nav><main><h1>FAQ</h1>"
        "<p>Questions people ask about the tool, with the answers the maintainers gave.</p>"
        "<h2>Licence</h2><p>The tool is free software under the MIT licence.</p></main></body></html>"
    )
    (root / "notes.txt").write_text("A plain note without headings. " * 30)
    (root / "rows.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"Row number {i} of the table."}) + "\n" for i in range(5)))
    pdf_writer(root / "report.pdf", [["Page one of the report."], ["Page two, with the results."]])
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    return root


def _stored(index_dir, encoder):
    """Every stored document in order with its chunks (text, offsets, heading path) and vectors."""
    index = RagIndex.load(index_dir, encoder=encoder)
    try:
        out = {}
        for doc_id in sorted(index.documents):
            ids = index.doc_chunk_ids(doc_id)
            chunks = [{k: v for k, v in index.get_chunk(i).items() if k != "chunk_id"} for i in ids]
            out[doc_id] = (index.documents[doc_id]["metadata"], chunks, index.chunk_vectors(ids))
        return out
    finally:
        index.close()


@pytest.mark.slow
def test_local_ray_cluster_gives_the_local_engines_chunks_and_vectors(tmp_path, encoder, pdf_writer):
    import ray

    folder = _folder(tmp_path / "kb", pdf_writer)
    sources = list(iter_source_files(folder))
    assert connect(num_cpus=2)  # one local 2-CPU cluster for both checks below
    try:
        results = list(process_sources_with_ray(sources, MODEL, chunk_size=32, chunk_overlap=8, files_per_batch=2))
        config = RagConfig.model_validate(
            {"model": {"chunk_size": 32, "chunk_overlap": 8}, "data": {"documents_file": None, "sources": [str(folder)]}, "system": {"device": "cpu"}}
        )
        ray_report = ingest([folder], tmp_path / "ray_index", engine="ray", config=config, encoder=encoder)
    finally:
        ray.shutdown()

    assert [r.source for r in results] == sources  # same order as the local engine
    for source, result in zip(sources, results):
        if source.rel_id == "broken.pdf":
            assert result.error.startswith("not a readable PDF (")
            assert result.documents == [] and result.vectors is None
            continue
        documents, chunks = read_and_chunk(source, encoder.tokenizer, 32, 8)
        assert result.error is None
        assert result.documents == documents and result.chunks == chunks
        vectors = encoder.encode([c.text for cs in chunks for c in cs])
        assert result.vectors.shape == vectors.shape == (sum(map(len, chunks)), encoder.dim)
        assert np.abs(result.vectors - vectors).max() < 1e-5
    by_id = {r.source.rel_id: r for r in results}
    assert [d.id for d in by_id["report.pdf"].documents] == ["report.pdf#p1", "report.pdf#p2"]
    assert len(by_id["rows.jsonl"].documents) == 5 and len(by_id["guide/install.md"].chunks[0]) > 2
    assert {tuple(c.heading_path) for c in by_id["guide/install.md"].chunks[0]} == {("Install",), ("Install", "From source")}

    # Through ingest(): the same store as the local engine.
    local_report = ingest([folder], tmp_path / "local_index", engine="local", config=config, encoder=encoder)
    for key in ("added", "updated", "deleted", "unchanged", "skipped", "num_documents", "num_chunks"):
        assert getattr(ray_report, key) == getattr(local_report, key), key
    assert ray_report.added == 10 and ray_report.skipped == 1 and ray_report.skipped_files[0][0].endswith("broken.pdf")
    local, remote = _stored(tmp_path / "local_index", encoder), _stored(tmp_path / "ray_index", encoder)
    assert list(remote) == list(local)
    for doc_id, (metadata, chunks, vectors) in local.items():
        assert remote[doc_id][0] == metadata and remote[doc_id][1] == chunks
        assert np.abs(remote[doc_id][2] - vectors).max() < 1e-5
