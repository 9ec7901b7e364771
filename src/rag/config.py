"""The typed config of the RAG indexer (``configs/rag_indexer.yaml``).

Sections: ``model`` (embedding model, chunking), ``index`` (FAISS index type and its
parameters), ``retrieval`` (dense / BM25 / hybrid search), ``training`` (embedding batch
size), ``data``, ``paths``, ``system``. Unknown keys and bad values are one-line
``ConfigError``s (see :func:`src.core.config.load_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from src.core.config import BaseConfig, ExistingFile, PathsConfig, StrictModel, SystemConfig

# convex-<w>: min-max-normalised dense and BM25 scores fused with dense weight w (src/rag/fusion.py).
SearchMode = Literal["dense", "bm25", "hybrid", "convex-0", "convex-0.25", "convex-0.5", "convex-0.75", "convex-1"]


class RagModelConfig(StrictModel):
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    embedding_dim: int = Field(384, gt=0, description="must equal the embedding model's output size")
    embedding_precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32",
        description="bf16: documents are embedded under bf16 autocast (vectors stay float32; 2.5x faster on a CPU with "
        "native bf16, cosine >= 0.99997 to fp32); auto: bf16 where the device computes it natively, else fp32. Fixed when "
        "the index is built (documents added later are embedded the same way); queries are always embedded in fp32",
    )
    chunk_size: int = Field(200, gt=0, description="word-pieces of the embedding model's tokenizer per chunk")
    chunk_overlap: int = Field(32, ge=0, description="word-pieces shared by consecutive chunks")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "RagModelConfig":
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size})")
        return self


class RagIndexConfig(StrictModel):
    type: Literal["flat", "pq-refine", "ivf", "hnsw"] = Field(
        "flat",
        description="flat: exact inner product; pq-refine: every vector scored from 4-bit PQ codes, the best "
        "k * refine_k_factor re-scored exactly (a large flat corpus at a tenth of the scan time); ivf / hnsw: approximate",
    )
    pq_m: int | None = Field(None, gt=0, description="pq-refine: PQ sub-vectors (must divide the dimension; default dimension / 2)")
    refine_k_factor: int = Field(20, gt=0, description="pq-refine: candidates re-scored with the float vectors, per result asked for")
    ivf_nlist: int = Field(100, gt=0, description="IVF cells (needs at least this many chunks to train)")
    ivf_nprobe: int = Field(10, gt=0, description="IVF cells visited per query")
    hnsw_m: int = Field(32, gt=1, description="HNSW neighbours per node")
    hnsw_ef_construction: int = Field(200, gt=0)
    hnsw_ef_search: int = Field(64, gt=0)
    on_disk: bool = Field(
        False,
        description="ivf only: the large-corpus path. faiss.index is trained on a sample, built in shards and merged "
        "into inverted lists memory-mapped from faiss.ivfdata (for corpora larger than RAM)",
    )
    ivf_train_sample: int = Field(100_000, gt=0, description="on_disk: vectors the IVF cells are trained on")
    ivf_shard_size: int = Field(1_000_000, gt=0, description="on_disk: vectors per shard (each shard one file, merged at the end)")

    @model_validator(mode="after")
    def _on_disk_is_ivf(self) -> "RagIndexConfig":
        if self.on_disk and self.type != "ivf":
            raise ValueError(f"on_disk: needs type ivf (got {self.type})")
        return self


class RagRetrievalConfig(StrictModel):
    mode: SearchMode = "dense"
    top_k: int = Field(5, gt=0)
    candidates: int = Field(50, gt=0, description="documents taken from each ranking before hybrid fusion")
    rrf_k: int = Field(60, gt=0, description="reciprocal rank fusion constant: score = sum 1 / (rrf_k + rank)")
    bm25_k1: float = Field(1.5, gt=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
    eval_modes: list[SearchMode] = Field(default_factory=lambda: ["dense", "bm25", "hybrid"], min_length=1)
    eval_top_k: list[int] = Field(default_factory=lambda: [1, 3, 5], min_length=1)
    eval_val_fraction: float = Field(
        0.0, ge=0, lt=1,
        description="share of the eval queries held out as a val split (drawn with system.seed): every mode is scored on "
        "both splits, the hybrid fusion is chosen on val, and the reported numbers are the test split's (0: no split)",
    )
    hybrid_fusions: list[SearchMode] = Field(
        default_factory=lambda: ["hybrid"],
        description="with eval_val_fraction: the fusions (hybrid = RRF, convex-<w>) the hybrid row is chosen from, by "
        "recall at the largest eval_top_k on val (then nDCG)",
    )

    @model_validator(mode="after")
    def _positive_cutoffs(self) -> "RagRetrievalConfig":
        if any(k <= 0 for k in self.eval_top_k):
            raise ValueError(f"eval_top_k values must be positive (got {self.eval_top_k})")
        single = [m for m in self.hybrid_fusions if m in ("dense", "bm25", "convex-0", "convex-1")]
        if single:
            raise ValueError(f"hybrid_fusions: {single[0]} ranks by one score only (a fusion is hybrid or convex-<w>, 0 < w < 1)")
        return self


class RagTrainingConfig(StrictModel):
    batch_size: int = Field(32, gt=0, description="chunks per embedding batch")
    show_progress: bool = True


class RagDataConfig(StrictModel):
    documents_file: Optional[ExistingFile] = Field(
        Path("data/documents.jsonl"), description="MARK {id, text, metadata} JSONL or a BEIR corpus.jsonl (null: sources only)"
    )
    sources: list[Path] = Field(
        default_factory=list,
        description="files and folders ingested as `mark ingest` does (every supported format, recursively), besides documents_file",
    )
    eval_file: Optional[Path] = Field(
        Path("data/rag_eval.jsonl"),
        description="spec JSONL {query, relevant_docs} or a BEIR folder (queries.jsonl, qrels/<split>.tsv)",
    )
    beir_split: str = "test"

    @model_validator(mode="after")
    def _some_documents(self) -> "RagDataConfig":
        if self.documents_file is None and not self.sources:
            raise ValueError("documents_file or sources: at least one is needed")
        missing = [str(p) for p in self.sources if not Path(p).exists()]
        if missing:
            raise ValueError(f"sources: {missing[0]} does not exist")
        return self


class RagPathsConfig(PathsConfig):
    checkpoint_dir: Path = Path("checkpoints/rag")
    log_dir: Path = Path("logs/rag")


class RagConfig(BaseConfig):
    model: RagModelConfig = RagModelConfig()
    index: RagIndexConfig = RagIndexConfig()
    retrieval: RagRetrievalConfig = RagRetrievalConfig()
    training: RagTrainingConfig = RagTrainingConfig()
    data: RagDataConfig = RagDataConfig()
    paths: RagPathsConfig = RagPathsConfig()
    system: SystemConfig = SystemConfig()
