"""ingest(): files and folders into the store, incremental sync, skipped files, strict mode,
the `mark ingest` command killed with SIGKILL mid-build and resumed, and two writers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from src.core.errors import DataError
from src.rag.config import RagConfig
from src.rag.indexer import RagIndex
from src.rag.ingest import ingest
from src.rag.load import load_rag_index
from src.rag.store import STORE_FILE

REPO = Path(__file__).resolve().parents[2]
TOPICS = ["volcano lava magma", "bread yeast dough", "glacier ice valley", "comet orbit tail", "violin bow string", "tides moon ocean"]


def small_config(batch_size: int = 4) -> RagConfig:
    return RagConfig(model={"chunk_size": 64, "chunk_overlap": 8}, training={"batch_size": batch_size, "show_progress": False}, system={"device": "cpu"})


def write_folder(root: Path) -> Path:
    (root / "guide").mkdir(parents=True)
    (root / "guide" / "volcano.md").write_text("# Volcanoes\n\nA volcano erupts lava, ash and gas from magma chambers.\n")
    (root / "bread.txt").write_text("Knead the dough of flour, water, yeast and salt, let it rise, then bake the bread.\n")
    (root / "more.jsonl").write_text(
        '{"id": "glacier", "text": "Glaciers are slow rivers of ice carving valleys."}\n'
        '{"id": "comet", "text": "A comet has an icy nucleus and a tail pointing away from the sun."}\n'
    )
    (root / "broken.txt").write_bytes(b"\x00\x01\x02 binary \xff\xfe")
    (root / "latin1.md").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return root


def test_ingest_then_sync_embeds_only_what_changed(tmp_path, encoder, count_encoded):
    docs = write_folder(tmp_path / "docs")
    index_dir = tmp_path / "index"
    report = ingest([docs], index_dir, config=small_config(), encoder=encoder)
    assert (report.added, report.updated, report.deleted, report.unchanged, report.skipped) == (4, 0, 0, 0, 2)
    assert {Path(p).name for p, _ in report.skipped_files} == {"broken.txt", "latin1.md"}
    assert all(reason and "\n" not in reason for _, reason in report.skipped_files)
    assert report.num_documents == 4 and (index_dir / "faiss.index").is_file() and report.compacted

    retriever = load_rag_index(index_dir, device="cpu")
    hit = retriever.search("magma and lava eruptions", top_k=1, mode="hybrid")[0]
    assert hit.doc_id == "guide/volcano.md" and hit.source == "guide/volcano.md" and hit.metadata["title"] == "Volcanoes"
    retriever.index.close()

    count_encoded.clear()
    again = ingest([docs], index_dir, config=small_config(), encoder=encoder)
    assert (again.added, again.updated, again.deleted, again.unchanged) == (0, 0, 0, 4) and count_encoded == []

    (docs / "bread.txt").write_text("Sourdough bread rises slowly with a wild yeast starter.\n")
    (docs / "guide" / "violin.md").write_text("# Violins\n\nA violin is played with a bow drawn across its strings.\n")
    (docs / "more.jsonl").unlink()
    kept = ingest([docs], index_dir, config=small_config(), encoder=encoder)  # without --sync nothing is deleted
    assert (kept.added, kept.updated, kept.deleted) == (1, 1, 0)
    assert sorted(count_encoded) == sorted([
        "Sourdough bread rises slowly with a wild yeast starter.", "# Violins\n\nA violin is played with a bow drawn across its strings.",
    ])
    synced = ingest([docs], index_dir, sync=True, config=small_config(), encoder=encoder)
    assert (synced.added, synced.updated, synced.deleted, synced.unchanged) == (0, 0, 2, 3)
    index = RagIndex.load(index_dir, encoder=encoder)
    assert set(index.documents) == {"guide/volcano.md", "bread.txt", "guide/violin.md"}
    index.close()


def test_strict_turns_a_skip_into_an_error_and_include_exclude_filter(tmp_path, encoder):
    docs = write_folder(tmp_path / "docs")
    with pytest.raises(DataError, match=r"broken.txt: .*--strict"):
        ingest([docs], tmp_path / "strict", strict=True, config=small_config(), encoder=encoder)
    report = ingest([docs], tmp_path / "md", include=["*.md"], exclude=["latin1.md"], config=small_config(), encoder=encoder)
    assert (report.added, report.skipped, report.files) == (1, 0, 1)


def _ingest_command(docs: Path, index_dir: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "src.training.orchestrator", "ingest", str(docs), "--index", str(index_dir), "--config", str(config)]


def _committed_documents(index_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index_dir / STORE_FILE}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT value FROM meta WHERE key = 'num_documents'").fetchone()[0])
    except (sqlite3.Error, TypeError):
        return 0


def test_sigkill_mid_build_then_resume_equals_an_uninterrupted_build(tmp_path, encoder):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"note_{i:03d}.txt").write_text(f"Note {i} is about {TOPICS[i % len(TOPICS)]} and item number {i * 7}.\n")
    config_file = tmp_path / "rag.yaml"
    config_file.write_text(yaml.safe_dump({"model": {"chunk_size": 64, "chunk_overlap": 8}, "training": {"batch_size": 2, "show_progress": False}, "system": {"device": "cpu"}}))
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(_ingest_command(docs, killed_dir, config_file), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while _committed_documents(killed_dir) < 16 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # mid-build: some batches committed, one in flight
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    committed = _committed_documents(killed_dir)
    assert 16 <= committed < 40  # commits of 16 documents (batch_size 2 x 8)

    # The killed store opens, holds whole committed batches only, and is not locked.
    partial = RagIndex.load(killed_dir, encoder=encoder)
    assert len(partial.documents) == committed and partial.num_vectors >= partial.num_chunks == committed
    partial.close()

    config = small_config(batch_size=2)
    resumed = ingest([docs], killed_dir, config=config, encoder=encoder)  # the same command again
    assert resumed.unchanged == committed and resumed.added == 40 - committed
    ingest([docs], tmp_path / "whole", config=config, encoder=encoder)

    a, b = RagIndex.load(killed_dir, encoder=encoder), RagIndex.load(tmp_path / "whole", encoder=encoder)
    assert a.num_chunks == b.num_chunks == 40 and a.num_vectors == 40
    chunks_a, chunks_b = a.get_chunks(range(40)), b.get_chunks(range(40))
    assert chunks_a == chunks_b  # same ids, documents, offsets and texts
    np.testing.assert_allclose(a.chunk_vectors(range(40)), b.chunk_vectors(range(40)), atol=1e-5)
    assert a.corpus_checksum == b.corpus_checksum
    a.close()
    b.close()


def test_a_second_writer_is_refused_with_one_line_exit_2(tmp_path, encoder):
    docs = write_folder(tmp_path / "docs")
    index_dir = tmp_path / "index"
    ingest([docs / "bread.txt"], index_dir, config=small_config(), encoder=encoder)
    holder = RagIndex.load(index_dir, encoder=encoder, writable=True)
    try:
        config_file = tmp_path / "rag.yaml"
        config_file.write_text(yaml.safe_dump({"model": {"chunk_size": 64, "chunk_overlap": 8}, "system": {"device": "cpu"}}))
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        out = subprocess.run(_ingest_command(docs, index_dir, config_file), cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines()[-1] == f"error: {index_dir}: another writer (pid {os.getpid()}) is changing this RAG index; wait for it to finish"
    finally:
        holder.close()
    assert len(RagIndex.load(index_dir, encoder=encoder).documents) == 1  # untouched


def test_the_rag_recipe_reads_data_sources(tmp_path, encoder):
    from src.rag.train import run

    docs = write_folder(tmp_path / "docs")
    cfg = RagConfig(
        model={"chunk_size": 64, "chunk_overlap": 8}, training={"show_progress": False}, system={"device": "cpu"},
        data={"documents_file": None, "sources": [docs], "eval_file": None},
        paths={"checkpoint_dir": tmp_path / "ckpt", "log_dir": tmp_path / "logs"},
    )
    summary = run(cfg)
    assert summary["metrics"]["num_documents"] == 4  # the two unreadable files are skipped
    index = RagIndex.load(tmp_path / "ckpt", encoder=encoder)
    assert "guide/volcano.md" in index.documents and index.documents["bread.txt"]["metadata"]["source"] == "bread.txt"
    index.close()


def test_one_changed_row_of_a_jsonl_file_re_embeds_only_that_row(tmp_path, encoder, count_encoded):
    """The file's hash and mtime are in every row's metadata but not in its document hash."""
    docs = tmp_path / "docs"
    docs.mkdir()
    rows = docs / "rows.jsonl"
    rows.write_text('{"id": "a", "text": "Glaciers are slow rivers of ice carving valleys."}\n'
                    '{"id": "b", "text": "A comet has an icy nucleus and a tail pointing away from the sun."}\n')
    index_dir = tmp_path / "index"
    ingest([docs], index_dir, config=small_config(), encoder=encoder)
    count_encoded.clear()
    rows.write_text('{"id": "a", "text": "Glaciers are slow rivers of ice carving valleys."}\n'
                    '{"id": "b", "text": "A comet is a ball of ice whose tail points away from the sun."}\n')
    report = ingest([docs], index_dir, config=small_config(), encoder=encoder)
    assert (report.added, report.updated, report.deleted, report.unchanged) == (0, 1, 0, 1)
    assert count_encoded == ["A comet is a ball of ice whose tail points away from the sun."]
