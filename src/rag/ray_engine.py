"""The Ray engine of ingestion: reading, chunking and embedding on Ray Data.

    for result in process_sources_with_ray(sources, "sentence-transformers/all-MiniLM-L6-v2", 200, 32):
        result.documents, result.chunks, result.vectors   # in the order of `sources`

The same functions as the local engine run on the cluster, in two ``map_batches`` stages:

    ray.data.from_items(files)
      -> map_batches(ReadAndChunk)   read_source_file + chunk_document (an actor: the tokenizer loads once)
      -> map_batches(EmbedChunks)    Encoder.encode, an actor pool of encoders (``num_gpus`` each on GPUs)
      -> the driver, in input order  (the caller writes the store, as the local engine does)

Without ``ray_address`` a local Ray cluster is started (``num_cpus`` CPUs, default all of
them) and shut down at the end; with one (``auto``, ``ray://host:10001``) the run joins that
cluster, whose workers must have MARK and the embedding model installed. A file that cannot
be read comes back with ``error`` set (the local engine's skip), never as a failed run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from src.core.errors import ConfigError, UnreadableFileError
from src.data.files import ReaderOptions, SourceFile, read_source_file
from src.data.readers import Document
from src.rag.chunking import Chunk, chunk_document
from src.rag.encoder import Encoder

# Environment the workers of a local cluster need: MARK importable, the hub offline as here.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HOME", "SENTENCE_TRANSFORMERS_HOME")
# The reader/chunker actor takes this share of a CPU; the encoders share the rest.
READER_CPUS = 0.5


@dataclass
class SourceResult:
    """One source file through the engine: its documents, their chunks (one list per document)
    and the chunks' vectors (``(total chunks, dim)`` float32, in document then chunk order).
    ``error`` is why a file could not be read (``UnreadableFileError.reason``), else None."""

    source: SourceFile
    documents: list[Document] = field(default_factory=list)
    chunks: list[list[Chunk]] = field(default_factory=list)
    vectors: Optional[np.ndarray] = None
    error: Optional[str] = None


def read_and_chunk(
    source: SourceFile, tokenizer, chunk_size: int, chunk_overlap: int, options: ReaderOptions | None = None
) -> tuple[list[Document], list[list[Chunk]]]:
    """The local engine's first two steps for one file: its documents and their chunks."""
    documents = read_source_file(source, options)
    return documents, [chunk_document(doc, tokenizer, chunk_size, chunk_overlap) for doc in documents]


class ReadAndChunk:
    """Ray Data stage 1: rows ``{i, path, root, rel_id}`` -> ``{i, error, payload}`` (JSON documents + chunks)."""

    def __init__(self, embedding_model: str, chunk_size: int, chunk_overlap: int, options: dict[str, Any]) -> None:
        self.tokenizer = Encoder(embedding_model, "cpu").tokenizer  # the encoder's own tokenizer, as locally
        self.chunk_size, self.chunk_overlap = chunk_size, chunk_overlap
        self.options = ReaderOptions(**options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"i": [], "error": [], "payload": []}
        for i, path, root, rel_id in zip(batch["i"], batch["path"], batch["root"], batch["rel_id"]):
            source = SourceFile(Path(path), Path(root), str(rel_id))
            try:
                documents, chunks = read_and_chunk(source, self.tokenizer, self.chunk_size, self.chunk_overlap, self.options)
                payload, error = json.dumps({"documents": [d.model_dump() for d in documents], "chunks": [[asdict(c) for c in cs] for cs in chunks]}), ""
            except UnreadableFileError as err:
                payload, error = "", err.reason
            out["i"].append(int(i))
            out["error"].append(error)
            out["payload"].append(payload)
        return out


class EmbedChunks:
    """Ray Data stage 2, one encoder per actor: adds ``vectors`` (float32 bytes) to each row,
    encoding the chunks of the whole batch of files in one call."""

    def __init__(self, embedding_model: str, device: str, batch_size: int, threads: int, precision: str = "fp32") -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.encoder = Encoder(embedding_model, device, precision=precision)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        texts_per_row = [
            [c["text"] for cs in json.loads(payload)["chunks"] for c in cs] if payload else [] for payload in batch["payload"]
        ]
        vectors = self.encoder.encode([t for texts in texts_per_row for t in texts], self.batch_size, documents=True)
        out = {"i": [int(i) for i in batch["i"]], "error": list(batch["error"]), "payload": list(batch["payload"]), "vectors": []}
        start = 0
        for texts in texts_per_row:
            out["vectors"].append(vectors[start : start + len(texts)].tobytes())
            start += len(texts)
        return out


def _repo_root() -> str:
    import src

    return str(Path(src.__file__).resolve().parent.parent)


def connect(ray_address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``ray_address``, or start a local one; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    if ray_address:
        ray.init(address=ray_address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=False)
        return True
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (_repo_root(), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, runtime_env={"env_vars": env_vars}, log_to_driver=False)
    return True


def _result(source: SourceFile, row: dict[str, Any], dim: Optional[int]) -> SourceResult:
    if row["error"]:
        return SourceResult(source, error=row["error"])
    payload = json.loads(row["payload"])
    documents = [Document(**d) for d in payload["documents"]]
    chunks = [[Chunk(**c) for c in cs] for cs in payload["chunks"]]
    vectors = np.frombuffer(row["vectors"], dtype=np.float32)
    count = sum(len(cs) for cs in chunks)
    vectors = vectors.reshape(count, -1) if count else np.zeros((0, dim or 0), dtype=np.float32)
    return SourceResult(source, documents, chunks, np.array(vectors))


def process_sources_with_ray(
    sources: Sequence[SourceFile],
    embedding_model: str,
    chunk_size: int,
    chunk_overlap: int,
    *,
    options: ReaderOptions | None = None,
    batch_size: int = 32,
    precision: str = "fp32",
    files_per_batch: int = 8,
    concurrency: int | None = None,
    num_cpus: int | None = None,
    ray_address: str | None = None,
) -> Iterator[SourceResult]:
    """Read, chunk and embed ``sources`` on Ray Data; yields one :class:`SourceResult` per source, in order.

    ``concurrency``: encoder actors (default: one per GPU when the cluster has GPUs, else
    one per CPU); each gets one GPU when there are GPUs. ``batch_size``: texts per encoder
    forward pass; ``files_per_batch``: files per ``map_batches`` batch. ``num_cpus``: CPUs of
    a local cluster (default all). A cluster this call started is shut down when the
    generator finishes.
    """
    import ray

    sources = list(sources)
    if not sources:
        return
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"ray concurrency: {concurrency} must be >= 1")
    started = connect(ray_address, num_cpus)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        encoders = concurrency or (gpus if gpus else max(1, int(cpus)))
        cpus_per_encoder = max(0.1, (cpus - READER_CPUS) / encoders) if not gpus else 1
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # results come back in the order of `sources`
        items = [{"i": i, "path": str(s.path), "root": str(s.root), "rel_id": s.rel_id} for i, s in enumerate(sources)]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), len(items) // files_per_batch + 1)))
        dataset = dataset.map_batches(
            ReadAndChunk,
            fn_constructor_kwargs={
                "embedding_model": embedding_model,
                "chunk_size": chunk_size,
                "chunk_overlap": chunk_overlap,
                "options": (options or ReaderOptions()).model_dump(),
            },
            batch_size=files_per_batch,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=READER_CPUS,
        )
        dataset = dataset.map_batches(
            EmbedChunks,
            fn_constructor_kwargs={
                "embedding_model": embedding_model,
                "device": "cuda" if gpus else "cpu",
                "batch_size": batch_size,
                "precision": precision,
                "threads": max(1, round(cpus_per_encoder)),
            },
            batch_size=files_per_batch,
            compute=ray.data.ActorPoolStrategy(size=encoders),
            num_cpus=cpus_per_encoder,
            num_gpus=1 if gpus else 0,
        )
        for row in dataset.iter_rows():
            yield _result(sources[row["i"]], row, None)
    finally:
        if started:
            ray.shutdown()
