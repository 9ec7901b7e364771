"""The document index: chunks of documents, their embeddings, and search over both.

A :class:`RagIndex` is the embedding model plus a :class:`~src.rag.store.ChunkStore` (SQLite
documents, chunks and keyword index; FAISS vectors; see :mod:`src.rag.store` for the files).
It chunks and embeds documents, stores them, and answers the questions the retriever asks.
An index made with ``RagIndex(encoder, ...)`` lives in memory until :meth:`RagIndex.save`;
one opened with :meth:`RagIndex.load` reads the folder, and one opened with
``writable=True`` (what :func:`src.rag.ingest.ingest` does) commits every change to it.
Adding documents embeds only the new ones; deleting never re-embeds anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from tqdm.auto import tqdm

from src.core.errors import CheckpointError, ConfigError, DataError
from src.core.hub import resolve_pretrained
from src.core.logging import get_logger
from src.data.readers import Document
from src.rag.chunking import Chunk, check_chunk_size, chunk_document
from src.rag.config import RagIndexConfig
from src.rag.encoder import Encoder
from src.rag.store import INDEX_FILE, METADATA_FILE, STORE_FILE, ChunkRecord, ChunkStore, DocumentRecord, build_ivf_on_disk, search_faiss

__all__ = ["INDEX_FILE", "METADATA_FILE", "STORE_FILE", "RagIndex", "document_hash", "search_faiss"]

log = get_logger("rag")

# Metadata keys that describe the file a document came from, not the document: a touched
# file (new mtime) with the same text is not re-embedded.
VOLATILE_METADATA = ("mtime", "content_hash")


def document_hash(doc: Document) -> str:
    """SHA-256 of a document's id, text and metadata (canonical JSON, file mtime/hash left out)."""
    metadata = {k: v for k, v in doc.metadata.items() if k not in VOLATILE_METADATA}
    blob = json.dumps({"id": doc.id, "text": doc.text, "metadata": metadata}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _as_document(doc: Document | dict) -> Document:
    return doc if isinstance(doc, Document) else Document.model_validate(doc)


def index_settings(encoder: Encoder, index_config: RagIndexConfig, chunk_size: int, chunk_overlap: int, seed: int) -> dict[str, Any]:
    """How an index is built (stored in the store and its manifest, fixed at creation)."""
    cfg = index_config
    params: dict[str, Any] = {"type": cfg.type}
    if cfg.type == "ivf":
        params.update(ivf_nlist=cfg.ivf_nlist, ivf_nprobe=cfg.ivf_nprobe)
        if cfg.on_disk:
            params.update(on_disk=True, ivf_train_sample=cfg.ivf_train_sample, ivf_shard_size=cfg.ivf_shard_size)
    elif cfg.type == "hnsw":
        params.update(hnsw_m=cfg.hnsw_m, hnsw_ef_construction=cfg.hnsw_ef_construction, hnsw_ef_search=cfg.hnsw_ef_search)
    return {
        "embedding_model": encoder.name,
        "embedding_dim": encoder.dim,
        "embedding_precision": encoder.precision,
        "max_seq_length": encoder.max_seq_length,
        "chunking": {"unit": "word-pieces of the embedding model's tokenizer", "chunk_size": chunk_size, "chunk_overlap": chunk_overlap},
        "index": params,
        "seed": seed,
    }


class RagIndex:
    """Documents chunked and embedded by ``encoder``, held in a :class:`ChunkStore`.

    ``documents`` maps each doc id to ``{"sha256", "num_chars", "num_chunks", "metadata"}``;
    :meth:`get_chunk` gives a chunk (doc_id, chunk_index, text, offsets, heading_path).
    Build with :meth:`add_documents`, persist with :meth:`save`, reopen with :meth:`load`.
    """

    def __init__(
        self,
        encoder: Encoder,
        index_config: RagIndexConfig | None = None,
        chunk_size: int = 200,
        chunk_overlap: int = 32,
        batch_size: int = 32,
        show_progress: bool = False,
        seed: int = 42,
        store: ChunkStore | None = None,
    ) -> None:
        check_chunk_size(chunk_size, encoder.max_seq_length, encoder.num_special_tokens)
        if not 0 <= chunk_overlap < chunk_size:
            raise ConfigError(f"model.chunk_overlap: {chunk_overlap} must be in [0, chunk_size={chunk_size})")
        self.encoder = encoder
        self.index_config = index_config or RagIndexConfig()
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.seed = seed
        self.store = store or ChunkStore.in_memory(index_settings(encoder, self.index_config, chunk_size, chunk_overlap, seed))
        # Bumped on every change, so anything cached on the contents knows it is stale.
        self.version = 0

    # ----------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def num_chunks(self) -> int:
        return self.store.num_chunks

    @property
    def num_vectors(self) -> int:
        """Vectors stored (those of deleted chunks included until a compaction)."""
        return self.store.num_vectors

    @property
    def documents(self) -> Mapping[str, dict[str, Any]]:
        return self.store.documents

    @property
    def corpus_checksum(self) -> str:
        return self.store.corpus_checksum

    @property
    def path(self) -> Path | None:
        """The folder the index reads and writes (``None``: in memory)."""
        return self.store.path if self.store.writable else None

    def get_chunk(self, chunk_id: int) -> dict[str, Any]:
        """One chunk: ``{chunk_id, doc_id, chunk_index, start_char, end_char, start_token, end_token, heading_path, text}``."""
        chunks = self.store.get_chunks([chunk_id])
        if chunk_id not in chunks:
            raise KeyError(f"no chunk {chunk_id}")
        return chunks[chunk_id]

    def get_chunks(self, chunk_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """:meth:`get_chunk` for many ids at once: ``{chunk_id: chunk}`` (unknown ids left out)."""
        return self.store.get_chunks(list(chunk_ids))

    def doc_chunk_ids(self, doc_id: str) -> list[int]:
        """The chunk ids of one document, in order (``[]`` for an unknown id)."""
        return self.store.doc_chunk_ids(doc_id)

    # ----------------------------------------------------------------- building
    def chunk_document(self, doc: Document) -> list[Chunk]:
        """The chunks of one document under this index's chunking settings (following its sections)."""
        return chunk_document(doc, self.encoder.tokenizer, self.chunk_size, self.chunk_overlap)

    def _writable_store(self) -> ChunkStore:
        if not self.store.writable:  # opened read-only: keep the folder as it is, change a copy
            log.info("%s was opened read-only: changes stay in memory until save()", self.store.path)
            self.store = self.store.to_memory()
        return self.store

    def prepare_documents(self, docs: list[Document], embedded: Mapping[str, tuple[list[Chunk], np.ndarray]] | None = None) -> tuple[list[DocumentRecord], list[str]]:
        """Chunk documents into store records (``embedded`` holds chunks made elsewhere); returns them and the chunk texts."""
        records: list[DocumentRecord] = []
        for doc in tqdm(docs, desc="chunking", unit="doc", disable=not self.show_progress or len(docs) < 2):
            chunks = embedded[doc.id][0] if embedded and doc.id in embedded else self.chunk_document(doc)
            if not chunks:
                log.warning("document '%s' has no tokens for the embedding model; indexed with no chunks", doc.id)
            records.append(
                DocumentRecord(
                    doc.id, doc.metadata, document_hash(doc), len(doc.text),
                    [
                        ChunkRecord(c.chunk_index, c.text, c.start_char, c.end_char, c.start_token, c.end_token, list(c.heading_path))
                        for c in chunks
                    ],
                )
            )
        return records, [c.text for r in records for c in r.chunks]

    def add_documents(
        self,
        documents: Iterable[Document | dict],
        replace: Iterable[str] = (),
        files: Iterable[tuple[str, str, int]] = (),
        embedded: Mapping[str, tuple[list[Chunk], np.ndarray]] | None = None,
    ) -> int:
        """Chunk, embed and store new documents in one commit; returns the number of chunks added.

        ``documents`` are :class:`~src.data.readers.Document` or ``{id, text, metadata}``
        dicts. An id already in the index (or twice in the batch) is a ``DataError`` unless
        it is in ``replace`` (those documents are deleted in the same commit). ``files`` are
        source files completed by this commit (see :meth:`ChunkStore.add`). Only these
        documents are embedded. ``embedded``: ``{doc_id: (chunks, vectors)}`` already made
        by this index's chunking and model elsewhere (the Ray engine); those are stored as given.
        """
        docs = [_as_document(d) for d in documents]
        replace = set(replace)
        seen: set[str] = set()
        for doc in docs:
            if doc.id in seen or (doc.id not in replace and doc.id in self.documents):
                raise DataError(f"document id '{doc.id}' is already in the index (delete it first to replace it)")
            seen.add(doc.id)
        if not docs:
            return 0
        records, texts = self.prepare_documents(docs, embedded)
        if not embedded:
            vectors = self.encoder.encode(texts, self.batch_size, self.show_progress, documents=True)
        else:  # encode only what was not embedded elsewhere, keep the documents' order
            missing = [c.text for doc, r in zip(docs, records) if doc.id not in embedded for c in r.chunks]
            encoded, used, parts = self.encoder.encode(missing, self.batch_size, self.show_progress, documents=True), 0, []
            for doc, r in zip(docs, records):
                if doc.id in embedded:
                    parts.append(embedded[doc.id][1])
                else:
                    parts.append(encoded[used : used + len(r.chunks)])
                    used += len(r.chunks)
            vectors = np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)
        self._writable_store().add(records, vectors, replace=sorted(replace), files=list(files))
        self.version += 1
        return len(texts)

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        """Remove documents by id; returns the number of chunks removed. An unknown id is a ``DataError``.

        Nothing is re-embedded; the vectors of removed chunks are dropped at the next compaction.
        """
        doc_ids = list(dict.fromkeys(str(d) for d in doc_ids))
        unknown = [d for d in doc_ids if d not in self.documents]
        if unknown:
            raise DataError(f"cannot delete: document id(s) not in the index: {', '.join(unknown[:5])}")
        if not doc_ids:
            return 0
        removed = self._writable_store().delete(doc_ids)
        self.version += 1
        return removed

    def sync_documents(self, documents: Iterable[Document | dict]) -> dict[str, int]:
        """Make the index hold exactly ``documents``, embedding only what is new or changed.

        Returns counts: ``added``, ``updated`` (content changed: re-embedded), ``deleted``
        (no longer in ``documents``) and ``unchanged``.
        """
        docs = [_as_document(d) for d in documents]
        wanted = {doc.id: doc for doc in docs}
        held = self.documents
        changed = [d.id for d in docs if d.id in held and held[d.id]["sha256"] != document_hash(d)]
        gone = [doc_id for doc_id in held if doc_id not in wanted]
        new = [d for d in docs if d.id not in held]
        if gone:
            self.delete_documents(gone)
        self.add_documents(new + [wanted[doc_id] for doc_id in changed], replace=changed)
        return {"added": len(new), "updated": len(changed), "deleted": len(gone), "unchanged": len(docs) - len(new) - len(changed)}

    def compact(self) -> None:
        """Merge the appended vectors into ``faiss.index`` and drop deleted chunks' vectors
        (``index.on_disk``: rebuild the on-disk IVF, see :func:`src.rag.store.build_ivf_on_disk`)."""
        store = self._writable_store()
        params = store.settings["index"]
        if params.get("on_disk") and store.path is not None:
            build_ivf_on_disk(store, params["ivf_train_sample"], params["ivf_shard_size"])
        else:
            store.compact()

    # ----------------------------------------------------------------- reading
    def chunk_vectors(self, chunk_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors of the given chunk ids, ``(n, dim)`` float32."""
        ids = [int(i) for i in chunk_ids]
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.store.vectors(ids)

    def search_vectors(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-``k`` chunk ids per query: ``(scores, chunk_ids)``, both ``(n, k)``; -1 pads.

        Ids of deleted chunks are not filtered here (see :meth:`ChunkStore.search_vectors`).
        """
        query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if query_vectors.ndim == 1:
            query_vectors = query_vectors[None, :]
        if query_vectors.shape[1] != self.dim:
            raise ConfigError(f"query vectors have dimension {query_vectors.shape[1]}, the index has {self.dim}")
        return self.store.search_vectors(query_vectors, max(1, k))

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Trade speed for recall at query time: IVF ``nprobe`` or HNSW ``efSearch``."""
        self.store.set_search_params(nprobe, ef_search)

    # ----------------------------------------------------------------- persistence
    def save(self, checkpoint_dir: str | Path) -> dict[str, Path]:
        """Write the index to ``checkpoint_dir`` (compacted); returns the paths of its files.

        The index's own folder (opened writable) is only compacted; another folder gets a
        complete copy that replaces any index there.
        """
        checkpoint_dir = Path(checkpoint_dir)
        if self.path is not None and checkpoint_dir.resolve() == self.path.resolve():
            self.compact()
        else:
            self.store.save_copy(checkpoint_dir)
        return {"faiss_index": checkpoint_dir / INDEX_FILE, "metadata": checkpoint_dir / METADATA_FILE, "store": checkpoint_dir / STORE_FILE}

    def close(self) -> None:
        """Close the store (and release its writer lock)."""
        self.store.close()

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path,
        device: str = "auto",
        embedding_model: str | None = None,
        embedding_dim: int | None = None,
        encoder: Encoder | None = None,
        batch_size: int = 32,
        show_progress: bool = False,
        writable: bool = False,
    ) -> "RagIndex":
        """Open a saved index; every inconsistency is a one-line ``CheckpointError``.

        ``embedding_model`` / ``embedding_dim``, when given (e.g. from a config), must be
        what the index was built with. ``encoder`` reuses an already loaded model.
        ``writable=True`` takes the folder's writer lock and commits changes to it.
        """
        checkpoint_dir = Path(checkpoint_dir)
        store = ChunkStore.open(checkpoint_dir, writable=writable)
        try:
            settings = store.settings
            built_model, built_dim = settings["embedding_model"], int(settings["embedding_dim"])
            if embedding_model is not None and resolve_pretrained(embedding_model) != resolve_pretrained(built_model):
                raise CheckpointError(
                    f"{checkpoint_dir}: index was built with embedding model '{built_model}', not '{embedding_model}': rebuild the index"
                )
            if embedding_dim is not None and embedding_dim != built_dim:
                raise CheckpointError(f"{checkpoint_dir}: index has embedding dimension {built_dim}, not {embedding_dim}: rebuild the index")
            built_precision = settings.get("embedding_precision", "fp32")  # stores written before the key: fp32
            if encoder is None:
                encoder = Encoder(built_model, device, precision=built_precision)
            elif resolve_pretrained(encoder.name) != resolve_pretrained(built_model):
                raise CheckpointError(f"{checkpoint_dir}: index was built with '{built_model}', the encoder is '{encoder.name}'")
            elif encoder.precision != built_precision and encoder.requested_precision == "auto":
                encoder = encoder.with_precision(built_precision)  # an existing index keeps the precision it was built with
            elif encoder.precision != built_precision:
                raise CheckpointError(
                    f"{checkpoint_dir}: index was built with embedding_precision={built_precision}, the encoder runs "
                    f"{encoder.precision}: set model.embedding_precision: {built_precision}, or rebuild the index"
                )
            if encoder.dim != built_dim:
                raise CheckpointError(f"{checkpoint_dir}: embedding model '{built_model}' now outputs dimension {encoder.dim}, the index has {built_dim}")
            try:
                index_config = RagIndexConfig(**settings["index"])
                chunking = settings["chunking"]
                return cls(
                    encoder, index_config, chunk_size=int(chunking["chunk_size"]), chunk_overlap=int(chunking["chunk_overlap"]),
                    batch_size=batch_size, show_progress=show_progress, seed=int(settings.get("seed", 42)), store=store,
                )
            except (KeyError, TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
                reason = str(err).strip().splitlines()[0][:160]
                raise CheckpointError(f"{checkpoint_dir / STORE_FILE}: malformed settings ({type(err).__name__}: {reason})") from None
        except BaseException:
            store.close()
            raise

    @classmethod
    def create(
        cls, checkpoint_dir: str | Path, encoder: Encoder, index_config: RagIndexConfig | None = None, chunk_size: int = 200,
        chunk_overlap: int = 32, batch_size: int = 32, show_progress: bool = False, seed: int = 42,
    ) -> "RagIndex":
        """A new empty index in folder ``checkpoint_dir``, open for writing (holds the writer lock)."""
        index_config = index_config or RagIndexConfig()
        check_chunk_size(chunk_size, encoder.max_seq_length, encoder.num_special_tokens)
        store = ChunkStore.create(checkpoint_dir, index_settings(encoder, index_config, chunk_size, chunk_overlap, seed))
        return cls(encoder, index_config, chunk_size, chunk_overlap, batch_size, show_progress, seed, store=store)
