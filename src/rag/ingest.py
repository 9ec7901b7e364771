"""Ingest files and folders into a RAG index: the one public entry, :func:`ingest`.

    mark ingest docs/ notes.md --index checkpoints/rag [--include '*.md'] [--exclude 'drafts/*']
        [--sync] [--strict] [--engine local|ray] [--ray-address ADDR] [--config configs/rag_indexer.yaml]

Files are found recursively and read by the reader of their extension; a document's id is
its path relative to the root it was found under. Incremental: a file whose bytes are
unchanged since it was stored is not even read, and of a changed file only the documents
whose text or metadata changed are embedded again. ``sync`` removes the documents of files
that are gone. Work is committed in batches of about ``training.batch_size * 8`` chunks
(a SQLite transaction plus an append to the vector segment), so a killed run loses at most
one batch, and running the same command again continues where it stopped.
A file that cannot be read is skipped with one line naming it and why (``strict``: an error).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from src.core.errors import ConfigError, DataError, UnreadableFileError
from src.core.logging import get_logger
from src.data.files import iter_source_files, read_source_file
from src.data.readers import Document
from src.rag.config import RagConfig, RagIndexConfig, RagModelConfig, RagTrainingConfig
from src.rag.encoder import Encoder
from src.rag.indexer import RagIndex, document_hash
from src.rag.store import STORE_FILE, ChunkStore

log = get_logger("rag")

# Compact (merge the vector segment into faiss.index) at the end of a run when the segment
# holds at least this share of the vectors: adding a few documents to a big index then
# never rewrites it, and search never scans a large unindexed segment.
COMPACT_FRACTION = 0.2

@dataclass
class IngestReport:
    """What one :func:`ingest` run did. Counts are documents; ``skipped`` counts files."""

    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    skipped: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0
    embedded_chunks: int = 0
    num_documents: int = 0
    num_chunks: int = 0
    compacted: bool = False
    seconds: float = 0.0
    index_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: the counts and where the index is."""
        return (
            f"{self.index_dir}: {self.added} added, {self.updated} updated, {self.deleted} deleted, "
            f"{self.unchanged} unchanged, {self.skipped} file(s) skipped; {self.num_documents} documents, "
            f"{self.num_chunks} chunks ({self.embedded_chunks} embedded in {self.seconds:.1f}s)"
        )


def read_sources(paths: Sequence[str | Path], include=None, exclude=None, strict: bool = False) -> tuple[list[Document], list[tuple[str, str]]]:
    """Every document of the files under ``paths`` and the skipped ``(file, reason)`` pairs."""
    docs: list[Document] = []
    skipped: list[tuple[str, str]] = []
    for source in iter_source_files(paths, include, exclude):
        try:
            docs.extend(read_source_file(source))
        except DataError as err:
            _skip(source.path, err, strict, skipped)
    return docs, skipped


def _skip(path: Path, err: Exception, strict: bool, skipped: list[tuple[str, str]]) -> None:
    reason = str(err).split(": ", 1)[1] if str(err).startswith(str(path)) else str(err)
    if strict:
        raise DataError(f"{path}: {reason} (--strict: no file may be skipped)")
    log.warning("skipped %s: %s", path, reason)
    skipped.append((str(path), reason))


# ---------------------------------------------------------------------- ingest
def open_index(index_dir: Path, encoder: Encoder, model: RagModelConfig, index: RagIndexConfig, training: RagTrainingConfig, seed: int) -> RagIndex:
    """The index in ``index_dir`` opened for writing (created when there is none).

    An existing index built with another embedding model or chunking is a ``ConfigError``.
    """
    settings = dict(batch_size=training.batch_size, show_progress=training.show_progress)
    if not (index_dir / STORE_FILE).exists() and not (index_dir / "metadata.json").exists():
        return RagIndex.create(index_dir, encoder, index, model.chunk_size, model.chunk_overlap, seed=seed, **settings)
    rag_index = RagIndex.load(index_dir, encoder=encoder, writable=True, **settings)
    built = {"chunk_size": rag_index.chunk_size, "chunk_overlap": rag_index.chunk_overlap, "index.type": rag_index.index_config.type}
    wanted = {"chunk_size": model.chunk_size, "chunk_overlap": model.chunk_overlap, "index.type": index.type}
    for key in built:
        if built[key] != wanted[key]:
            rag_index.close()
            raise ConfigError(f"{key}: {index_dir} was built with {built[key]}, the config says {wanted[key]} (use another --index, or delete it to rebuild)")
    return rag_index


def ingest(
    paths: Sequence[str | Path],
    index_dir: str | Path = "checkpoints/rag",
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sync: bool = False,
    strict: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    config: RagConfig | None = None,
    encoder: Encoder | None = None,
) -> IngestReport:
    """Add the files under ``paths`` to the index in ``index_dir`` (created if needed).

    ``include`` / ``exclude``: glob patterns on the path relative to its root (or the file
    name). ``sync``: also delete documents whose files are gone. ``strict``: a file that
    cannot be read is a ``DataError`` instead of a skip. ``config``: the RAG config (model,
    chunking, index type, batch size; defaults otherwise). ``encoder`` reuses a loaded
    embedding model. Returns an :class:`IngestReport`.
    """
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine: '{engine}' is not one of local, ray")
    start = time.perf_counter()
    index_dir = Path(index_dir)
    model_cfg = config.model if config else RagModelConfig()
    index_cfg = config.index if config else RagIndexConfig()
    training_cfg = config.training if config else RagTrainingConfig()
    seed = config.system.seed if config else 42
    device = config.system.device if config else "auto"
    report = IngestReport(index_dir=str(index_dir))
    sources = list(iter_source_files(paths, include, exclude))  # discovery errors (a missing path) come before any write
    if (index_dir / STORE_FILE).exists():  # a second writer hears so now, not after loading the model
        ChunkStore.open(index_dir, writable=True).close()
    if encoder is None:
        encoder = Encoder(model_cfg.embedding_model, device, precision=model_cfg.embedding_precision)
    index = open_index(index_dir, encoder, model_cfg, index_cfg, training_cfg, seed)
    try:
        store = index.store
        stored_files = store.file_hashes()
        by_source = store.docs_by_source()
        # engine "ray": changed files are read, chunked and embedded on Ray first; the store is
        # then written here, in the same order and by the same code as the local engine.
        ray_results = _run_ray(sources, stored_files, model_cfg, training_cfg, ray_address) if engine == "ray" else {}
        embedded: dict[str, tuple[list, Any]] = {}
        seen_sources: set[str] = set()
        pending: list[tuple[Document, bool]] = []  # (document, replaces a stored one)
        file_rows: dict[str, tuple[str, str, int]] = {}
        last_doc_of_file: dict[str, str] = {}
        report.files = len(sources)
        for source in tqdm(sources, desc="reading", unit="file", disable=not training_cfg.show_progress or len(sources) < 2):
            rel = source.rel_id
            seen_sources.add(rel)
            try:
                content_hash = hashlib.sha256(source.path.read_bytes()).hexdigest()
                if stored_files.get(rel) == content_hash:
                    report.unchanged += len(by_source.get(rel, []))
                    continue
                docs = _ray_documents(ray_results[rel], embedded) if rel in ray_results else read_source_file(source)
            except (DataError, OSError) as err:
                _skip(source.path, err, strict, report.skipped_files)
                continue
            held = {doc_id for doc_id, _ in by_source.get(rel, [])}
            fresh = {d.id for d in docs}
            stale = sorted(held - fresh)  # documents this file no longer gives
            if stale:
                index.delete_documents(stale)
                report.deleted += len(stale)
            changed = []
            for doc in docs:
                if doc.id in store.documents:
                    if store.documents[doc.id]["sha256"] == document_hash(doc):
                        report.unchanged += 1
                        continue
                    changed.append((doc, True))
                else:
                    changed.append((doc, False))
            row = (rel, content_hash, len(docs))
            if changed:
                pending.extend(changed)
                last_doc_of_file[changed[-1][0].id] = rel
                file_rows[rel] = row
            else:
                store.record_files([row])
        if sync:
            gone = sorted(src for src in by_source if src not in seen_sources)
            gone_docs = [doc_id for src in gone for doc_id, _ in by_source[src]]
            if gone_docs:
                index.delete_documents(gone_docs)
                report.deleted += len(gone_docs)
            if gone:
                store.record_files([], forget=gone)
                log.info("sync: removed %d document(s) of %d file(s) that are gone", len(gone_docs), len(gone))
        _embed_in_batches(index, pending, file_rows, last_doc_of_file, training_cfg, report, embedded)
        report.skipped = len(report.skipped_files)
        vectors = index.num_vectors
        if store.base.ntotal == 0 and vectors or store.segment.ntotal > COMPACT_FRACTION * max(vectors, 1) or vectors > index.num_chunks * (1 + COMPACT_FRACTION):
            index.compact()
            report.compacted = True
        report.num_documents = len(index.documents)
        report.num_chunks = index.num_chunks
    finally:
        index.close()
    report.seconds = round(time.perf_counter() - start, 3)
    log.info("%s", report.summary())
    return report


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # read again (and skipped with the reason) by the main loop


def _run_ray(sources, stored_files, model: RagModelConfig, training: RagTrainingConfig, ray_address: str | None) -> dict[str, Any]:
    """The Ray engine's results (``SourceResult`` by relative path) for the files whose bytes changed."""
    from src.rag.ray_engine import process_sources_with_ray

    changed = [s for s in sources if stored_files.get(s.rel_id) != _file_sha256(s.path)]
    results = process_sources_with_ray(
        changed, model.embedding_model, model.chunk_size, model.chunk_overlap, batch_size=training.batch_size,
        precision=model.embedding_precision, ray_address=ray_address
    )
    return {result.source.rel_id: result for result in results}


def _ray_documents(result, embedded: dict[str, tuple[list, Any]]) -> list[Document]:
    """A Ray result's documents; their chunks and vectors go into ``embedded`` (an unreadable file raises)."""
    if result.error:
        raise UnreadableFileError(result.source.path, result.error)
    start = 0
    for doc, chunks in zip(result.documents, result.chunks):
        embedded[doc.id] = (chunks, result.vectors[start : start + len(chunks)])
        start += len(chunks)
    return result.documents


def _embed_in_batches(
    index: RagIndex, pending, file_rows, last_doc_of_file, training: RagTrainingConfig, report: IngestReport, embedded=None
) -> None:
    """Chunk, embed and commit ``pending`` documents, about ``batch_size * 8`` chunks per commit."""
    batch_chunks = training.batch_size * 8
    batch: list[tuple[Document, bool]] = []
    size = 0
    progress = tqdm(total=len(pending), desc="embedding", unit="doc", disable=not training.show_progress or not pending)

    def commit() -> None:
        nonlocal batch, size
        docs = [d for d, _ in batch]
        replace = [d.id for d, replaced in batch if replaced]
        files = [file_rows[last_doc_of_file[d.id]] for d in docs if d.id in last_doc_of_file]
        report.embedded_chunks += index.add_documents(docs, replace=replace, files=files, embedded=embedded)
        report.updated += len(replace)
        report.added += len(docs) - len(replace)
        progress.update(len(docs))
        batch, size = [], 0

    for doc, replaced in pending:
        batch.append((doc, replaced))
        size += max(1, len(doc.text) // 800)  # ~4 chars per word-piece, ~200 word-pieces per chunk
        if size >= batch_chunks:
            commit()
    if batch:
        commit()
    progress.close()
