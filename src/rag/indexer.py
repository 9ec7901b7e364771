"""The document index: chunks, their embeddings in FAISS, and the metadata that names them.

On disk (``checkpoints/rag/``):

* ``faiss.index``: the FAISS index; vector ``i`` is chunk ``i`` of the metadata.
* ``metadata.json``: plain JSON, never pickle: the embedding model, its dimension,
  the normalisation, the chunking and index settings, the corpus checksum, the SHA-256
  of ``faiss.index`` (so a metadata file from another build is refused), one entry per
  document (content hash, metadata) and one per chunk (doc id, char and token offsets, text).

Adding documents embeds only the new ones. Deleting documents rebuilds the FAISS index
from the vectors it already stores (all three index types keep the exact float vectors:
``IndexFlatIP``, ``IndexIVFFlat`` with a direct map, ``IndexHNSWFlat``), so nothing is
re-embedded. Rebuilding instead of ``remove_ids`` is deliberate: HNSW cannot remove
vectors, and keeping FAISS labels equal to positions in the chunk list means no id map
can drift from the metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np
from tqdm.auto import tqdm

from src.core.checkpoint import atomic_write_bytes, atomic_write_json, file_sha256
from src.core.errors import CheckpointError, ConfigError, DataError, NotTrainedError
from src.core.hub import resolve_pretrained
from src.core.logging import get_logger
from src.data.readers import Document
from src.rag.chunking import Chunk, check_chunk_size, chunk_document
from src.rag.config import RagIndexConfig
from src.rag.encoder import Encoder

INDEX_FILE = "faiss.index"
METADATA_FILE = "metadata.json"
METADATA_FORMAT = "mark-rag-index"
METADATA_VERSION = 1

log = get_logger("rag")


def document_hash(doc: Document) -> str:
    """SHA-256 of a document's id, text and metadata (canonical JSON)."""
    blob = json.dumps({"id": doc.id, "text": doc.text, "metadata": doc.metadata}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def corpus_checksum(doc_hashes: dict[str, str]) -> str:
    """Order-independent SHA-256 of a corpus, from ``{doc_id: document_hash}``."""
    lines = "\n".join(f"{doc_id}\t{doc_hashes[doc_id]}" for doc_id in sorted(doc_hashes))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def new_faiss_index(dim: int, config: RagIndexConfig) -> faiss.Index:
    """An empty inner-product FAISS index of ``config.type`` (IVF still needs training)."""
    if config.type == "flat":
        return faiss.IndexFlatIP(dim)
    if config.type == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, config.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = config.ivf_nprobe
        index.make_direct_map()  # lets vectors be read back for deletes and exact doc scores
        return index
    index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.hnsw_ef_construction
    index.hnsw.efSearch = config.hnsw_ef_search
    return index


def search_faiss(index: faiss.Index, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``, with one OpenMP thread when there is a single query.

    One query is too little work to split: OpenMP's waiting threads cost more than they
    save, badly so when other processes share the cores (measured on a loaded 2-core box,
    10k vectors: 40 ms per query with 2 threads, 1.5 ms with one). Batches keep all threads.
    The thread count is per calling thread in OpenMP, so concurrent searches don't interfere.
    """
    if len(query_vectors) > 1:
        return index.search(query_vectors, k)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(query_vectors, k)
    finally:
        faiss.omp_set_num_threads(threads)


def _as_document(doc: Document | dict) -> Document:
    return doc if isinstance(doc, Document) else Document.model_validate(doc)


class RagIndex:
    """Chunks of documents, embedded by ``encoder`` into a FAISS index.

    ``chunks[i]`` (a dict: doc_id, chunk_index, text, start_char, end_char, start_token,
    end_token) is vector ``i`` of ``faiss_index``. ``documents`` maps each doc id to
    ``{"sha256", "num_chars", "num_chunks", "metadata"}``. Build with :meth:`add_documents`,
    persist with :meth:`save`, reopen with :meth:`load`.
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
        self.faiss_index = new_faiss_index(encoder.dim, self.index_config)
        self.chunks: list[dict[str, Any]] = []
        self.documents: dict[str, dict[str, Any]] = {}
        self.doc_chunk_ids: dict[str, list[int]] = {}
        # Bumped on every change, so caches built on the chunks (BM25) know they are stale.
        self.version = 0

    # ----------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def corpus_checksum(self) -> str:
        return corpus_checksum({doc_id: info["sha256"] for doc_id, info in self.documents.items()})

    # ----------------------------------------------------------------- building
    def chunk_document(self, doc: Document) -> list[Chunk]:
        """The chunks of one document under this index's chunking settings (following its sections)."""
        return chunk_document(doc, self.encoder.tokenizer, self.chunk_size, self.chunk_overlap)

    def add_documents(self, documents: Iterable[Document | dict]) -> int:
        """Chunk, embed and index new documents; returns the number of chunks added.

        ``documents`` are :class:`~src.data.readers.Document` or ``{id, text, metadata}``
        dicts. An id already in the index (or twice in the batch) is a ``DataError``:
        delete it first to replace it. Only these documents are embedded.
        """
        docs = [_as_document(d) for d in documents]
        seen: set[str] = set()
        for doc in docs:
            if doc.id in self.documents or doc.id in seen:
                raise DataError(f"document id '{doc.id}' is already in the index (delete it first to replace it)")
            seen.add(doc.id)
        if not docs:
            return 0

        chunks_per_doc: list[list[Chunk]] = []
        for doc in tqdm(docs, desc="chunking", unit="doc", disable=not self.show_progress or len(docs) < 2):
            chunks = self.chunk_document(doc)
            if not chunks:
                log.warning("document '%s' has no tokens for the embedding model; indexed with no chunks", doc.id)
            chunks_per_doc.append(chunks)

        texts = [chunk.text for chunks in chunks_per_doc for chunk in chunks]
        vectors = self.encoder.encode(texts, self.batch_size, self.show_progress)
        self._add_vectors(vectors)

        for doc, chunks in zip(docs, chunks_per_doc):
            first = len(self.chunks)
            self.documents[doc.id] = {
                "sha256": document_hash(doc),
                "num_chars": len(doc.text),
                "num_chunks": len(chunks),
                "metadata": doc.metadata,
            }
            self.doc_chunk_ids[doc.id] = list(range(first, first + len(chunks)))
            self.chunks.extend(
                {
                    "doc_id": c.doc_id,
                    "chunk_index": c.chunk_index,
                    "start_char": c.start_char,
                    "end_char": c.end_char,
                    "start_token": c.start_token,
                    "end_token": c.end_token,
                    "text": c.text,
                    "heading_path": c.heading_path,
                }
                for c in chunks
            )
        self.version += 1
        return len(texts)

    def _add_vectors(self, vectors: np.ndarray) -> None:
        if len(vectors) == 0:
            return
        if not self.faiss_index.is_trained:
            nlist = self.index_config.ivf_nlist
            if len(vectors) < nlist:
                raise ConfigError(
                    f"index.ivf_nlist: {nlist} IVF cells need at least {nlist} chunks to train, "
                    f"the corpus has {len(vectors)} (lower ivf_nlist or use index.type=flat)"
                )
            faiss.extract_index_ivf(self.faiss_index).cp.seed = self.seed
            self.faiss_index.train(vectors)
        self.faiss_index.add(vectors)

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        """Remove documents by id; returns the number of chunks removed.

        An unknown id is a ``DataError``. The FAISS index is rebuilt from its own stored
        vectors (no re-embedding); IVF keeps its trained centroids.
        """
        doc_ids = list(dict.fromkeys(str(d) for d in doc_ids))
        unknown = [d for d in doc_ids if d not in self.documents]
        if unknown:
            raise DataError(f"cannot delete: document id(s) not in the index: {', '.join(unknown[:5])}")
        if not doc_ids:
            return 0
        drop = set(doc_ids)
        keep = np.array([i for i, c in enumerate(self.chunks) if c["doc_id"] not in drop], dtype=np.int64)
        removed = len(self.chunks) - len(keep)
        kept_vectors = self.chunk_vectors(keep)

        self.faiss_index = self._empty_like_current()
        if len(kept_vectors):
            self.faiss_index.add(kept_vectors)
        self.chunks = [self.chunks[i] for i in keep]
        for doc_id in doc_ids:
            del self.documents[doc_id]
        self._rebuild_doc_chunk_ids()
        self.version += 1
        return removed

    def sync_documents(self, documents: Iterable[Document | dict]) -> dict[str, int]:
        """Make the index hold exactly ``documents``, embedding only what is new or changed.

        Returns counts: ``added``, ``updated`` (content changed: re-embedded), ``deleted``
        (no longer in ``documents``) and ``unchanged``.
        """
        docs = [_as_document(d) for d in documents]
        wanted = {doc.id: doc for doc in docs}
        changed = [d.id for d in docs if d.id in self.documents and self.documents[d.id]["sha256"] != document_hash(d)]
        gone = [doc_id for doc_id in self.documents if doc_id not in wanted]
        new = [d for d in docs if d.id not in self.documents]
        if changed or gone:
            self.delete_documents(changed + gone)
        self.add_documents(new + [wanted[doc_id] for doc_id in changed])
        return {
            "added": len(new),
            "updated": len(changed),
            "deleted": len(gone),
            "unchanged": len(docs) - len(new) - len(changed),
        }

    def _empty_like_current(self) -> faiss.Index:
        if isinstance(self.faiss_index, faiss.IndexIVF):
            index = faiss.clone_index(self.faiss_index)  # keeps the trained centroids
            index.reset()
            index.make_direct_map()
            return index
        return new_faiss_index(self.dim, self.index_config)

    def _rebuild_doc_chunk_ids(self) -> None:
        self.doc_chunk_ids = {doc_id: [] for doc_id in self.documents}
        for i, chunk in enumerate(self.chunks):
            self.doc_chunk_ids[chunk["doc_id"]].append(i)

    # ----------------------------------------------------------------- reading
    def chunk_vectors(self, chunk_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors of the given chunk ids, ``(n, dim)`` float32."""
        ids = np.asarray(list(chunk_ids) if not isinstance(chunk_ids, np.ndarray) else chunk_ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.faiss_index.reconstruct_batch(ids)

    def search_vectors(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-``k`` chunks per query: ``(scores, chunk_ids)``, both ``(n, k)``; -1 pads."""
        query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if query_vectors.ndim == 1:
            query_vectors = query_vectors[None, :]
        if query_vectors.shape[1] != self.dim:
            raise ConfigError(f"query vectors have dimension {query_vectors.shape[1]}, the index has {self.dim}")
        k = max(1, min(k, self.num_chunks))
        if self.num_chunks == 0:
            n = len(query_vectors)
            return np.zeros((n, 0), dtype=np.float32), np.zeros((n, 0), dtype=np.int64)
        return search_faiss(self.faiss_index, query_vectors, k)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Trade speed for recall at query time: IVF ``nprobe`` or HNSW ``efSearch``."""
        if nprobe is not None and isinstance(self.faiss_index, faiss.IndexIVF):
            self.faiss_index.nprobe = nprobe
        if ef_search is not None and isinstance(self.faiss_index, faiss.IndexHNSW):
            self.faiss_index.hnsw.efSearch = ef_search

    # ----------------------------------------------------------------- persistence
    def metadata(self, index_sha256: str) -> dict[str, Any]:
        """The JSON-safe description written to ``metadata.json``."""
        return {
            "format": METADATA_FORMAT,
            "format_version": METADATA_VERSION,
            "embedding_model": self.encoder.name,
            "embedding_dim": self.dim,
            "normalized": True,
            "similarity": "inner product of L2-normalised vectors (cosine)",
            "max_seq_length": self.encoder.max_seq_length,
            "chunking": {"unit": "word-pieces of the embedding model's tokenizer", "chunk_size": self.chunk_size, "chunk_overlap": self.chunk_overlap},
            "index": {"type": self.index_config.type, **self._index_params()},
            "faiss_index_sha256": index_sha256,
            "corpus_checksum": self.corpus_checksum,
            "num_documents": len(self.documents),
            "num_chunks": self.num_chunks,
            "documents": self.documents,
            "chunks": self.chunks,
        }

    def _index_params(self) -> dict[str, int]:
        cfg = self.index_config
        if cfg.type == "ivf":
            return {"ivf_nlist": cfg.ivf_nlist, "ivf_nprobe": int(self.faiss_index.nprobe)}
        if cfg.type == "hnsw":
            return {"hnsw_m": cfg.hnsw_m, "hnsw_ef_construction": cfg.hnsw_ef_construction, "hnsw_ef_search": int(self.faiss_index.hnsw.efSearch)}
        return {}

    def save(self, checkpoint_dir: str | Path) -> dict[str, Path]:
        """Write ``faiss.index`` then ``metadata.json`` (each atomically); returns their paths."""
        checkpoint_dir = Path(checkpoint_dir)
        index_path = checkpoint_dir / INDEX_FILE
        metadata_path = checkpoint_dir / METADATA_FILE
        blob = faiss.serialize_index(self.faiss_index).tobytes()
        atomic_write_bytes(index_path, blob)
        atomic_write_json(metadata_path, self.metadata(hashlib.sha256(blob).hexdigest()))
        return {"faiss_index": index_path, "metadata": metadata_path}

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
    ) -> "RagIndex":
        """Open a saved index; every inconsistency is a one-line ``CheckpointError``.

        ``embedding_model`` / ``embedding_dim``, when given (e.g. from a config), must be
        what the index was built with. ``encoder`` reuses an already loaded model.
        """
        checkpoint_dir = Path(checkpoint_dir)
        index_path = checkpoint_dir / INDEX_FILE
        metadata_path = checkpoint_dir / METADATA_FILE
        if not index_path.is_file() and not metadata_path.is_file():
            raise NotTrainedError(
                f"{checkpoint_dir}: no RAG index (build it with "
                f"`python -m src.scripts.train_rag_indexer --config configs/rag_indexer.yaml`)"
            )
        for path in (index_path, metadata_path):
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (the index and its metadata are written together: rebuild the index)")
        try:
            meta = json.loads(metadata_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{metadata_path}: not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
            raise CheckpointError(f"{metadata_path}: not a MARK RAG index metadata file")
        try:
            built_model, built_dim = meta["embedding_model"], int(meta["embedding_dim"])
            chunks, documents = meta["chunks"], meta["documents"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{metadata_path}: malformed metadata (missing {err})") from None

        if meta.get("faiss_index_sha256") != file_sha256(index_path):
            raise CheckpointError(f"{metadata_path} does not match {index_path} (checksum differs): rebuild the index")
        if embedding_model is not None and resolve_pretrained(embedding_model) != resolve_pretrained(built_model):
            raise CheckpointError(
                f"{checkpoint_dir}: index was built with embedding model '{built_model}', not '{embedding_model}': rebuild the index"
            )
        if embedding_dim is not None and embedding_dim != built_dim:
            raise CheckpointError(
                f"{checkpoint_dir}: index has embedding dimension {built_dim}, not {embedding_dim}: rebuild the index"
            )
        try:
            faiss_index = faiss.read_index(str(index_path))
        except RuntimeError as err:
            raise CheckpointError(f"{index_path}: cannot read FAISS index ({str(err).strip().splitlines()[-1][:160]})") from None
        if faiss_index.d != built_dim or faiss_index.ntotal != len(chunks):
            raise CheckpointError(
                f"{metadata_path} does not match {index_path}: metadata says {len(chunks)} chunks of dimension "
                f"{built_dim}, the index holds {faiss_index.ntotal} of dimension {faiss_index.d}"
            )

        if encoder is None:
            encoder = Encoder(built_model, device)
        elif resolve_pretrained(encoder.name) != resolve_pretrained(built_model):
            raise CheckpointError(f"{checkpoint_dir}: index was built with '{built_model}', the encoder is '{encoder.name}'")
        if encoder.dim != built_dim:
            raise CheckpointError(
                f"{checkpoint_dir}: embedding model '{built_model}' now outputs dimension {encoder.dim}, the index has {built_dim}"
            )

        try:
            index_config = RagIndexConfig(**(meta.get("index") or {}))
            chunking = meta.get("chunking") or {}
            rag_index = cls(
                encoder,
                index_config,
                chunk_size=int(chunking["chunk_size"]),
                chunk_overlap=int(chunking["chunk_overlap"]),
                batch_size=batch_size,
                show_progress=show_progress,
            )
            rag_index.chunks = chunks
            rag_index.documents = documents
            rag_index._rebuild_doc_chunk_ids()
        except (KeyError, TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
            reason = str(err).strip().splitlines()[0][:160]
            raise CheckpointError(f"{metadata_path}: malformed metadata ({type(err).__name__}: {reason})") from None
        if isinstance(faiss_index, faiss.IndexIVF):
            faiss_index.make_direct_map()  # lets vectors be read back for deletes and exact doc scores
        rag_index.faiss_index = faiss_index
        return rag_index
