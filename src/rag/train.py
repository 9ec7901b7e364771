"""The RAG recipe: build the index over the documents, and optionally evaluate retrieval.

Top to bottom: load the documents (``data.documents_file`` and the files of
``data.sources``), load the embedding model, chunk + embed + index (``resume``: open the
saved index and embed only new or changed documents, dropping removed ones, committing as
it goes), save the store (``store.sqlite`` + ``faiss.index`` + ``metadata.json``, see
:mod:`src.rag.store`) + the effective config in ``paths.checkpoint_dir``; with
``evaluate``, score every mode of
``retrieval.eval_modes`` on ``data.eval_file``, print a table and write
``eval_metrics.json`` / ``eval_metrics.png`` beside the index.
Run it with ``python -m src.scripts.train_rag_indexer``.
"""

from __future__ import annotations

import time
from pathlib import Path

from src.core.checkpoint import atomic_write_json
from src.core.config import config_to_dict, save_config
from src.core.errors import CheckpointError, ConfigError
from src.core.logging import MetricsLogger, setup_logging
from src.core.runtime import seed_everything
from src.rag.beir import load_documents
from src.rag.config import RagConfig
from src.rag.encoder import Encoder
from src.rag.eval import evaluate_modes, plot_retrieval_metrics
from src.rag.indexer import INDEX_FILE, METADATA_FILE, STORE_FILE, RagIndex
from src.rag.ingest import read_sources
from src.rag.retriever import Retriever

EVAL_METRICS_FILE = "eval_metrics.json"
EVAL_PLOT_FILE = "eval_metrics.png"


def run(cfg: RagConfig, resume: bool = False, evaluate: bool = False) -> dict:
    """Build (or update, with ``resume``) the index and optionally evaluate it.

    Returns ``{"metrics": {...build stats, eval metrics of retrieval.mode...},
    "outputs": {"faiss_index", "metadata", "config", ["eval_metrics", "eval_plot"]}}``.
    """
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    log = setup_logging("rag", cfg.paths.log_dir)
    metrics_logger = MetricsLogger(
        cfg.paths.log_dir, "rag",
        use_tensorboard=cfg.system.use_tensorboard, use_wandb=cfg.system.use_wandb,
        wandb_project=cfg.system.wandb_project, config=config_to_dict(cfg),
    )
    seed_everything(cfg.system.seed)

    documents = load_documents(cfg.data.documents_file) if cfg.data.documents_file is not None else []
    if cfg.data.documents_file is not None:
        log.info("%s: %d documents", cfg.data.documents_file, len(documents))
    if cfg.data.sources:
        from_files, skipped = read_sources(cfg.data.sources)
        log.info("data.sources: %d documents (%d file(s) skipped)", len(from_files), len(skipped))
        documents += from_files
    encoder = Encoder(cfg.model.embedding_model, cfg.system.device, precision=cfg.model.embedding_precision)
    if encoder.dim != cfg.model.embedding_dim:
        raise ConfigError(
            f"model.embedding_dim: {cfg.model.embedding_dim}, but '{cfg.model.embedding_model}' outputs {encoder.dim}"
        )
    log.info("embedding model %s (dim %d, max %d word-pieces, %s) on %s", encoder.name, encoder.dim, encoder.max_seq_length,
             encoder.precision, encoder.device)

    start = time.perf_counter()
    index = _open_or_create_index(cfg, encoder, resume, log)
    if resume:
        changes = index.sync_documents(documents)
        log.info("resumed index: %s", ", ".join(f"{n} {what}" for what, n in changes.items()))
        embedded_docs = changes["added"] + changes["updated"]
    else:
        index.add_documents(documents)
        embedded_docs = len(documents)
    build_seconds = time.perf_counter() - start

    outputs = index.save(checkpoint_dir)
    index.close()  # releases the writer lock; evaluate the saved index, as everyone else will read it
    index = RagIndex.load(checkpoint_dir, encoder=encoder, batch_size=cfg.training.batch_size)
    index.set_search_params(nprobe=cfg.index.ivf_nprobe, ef_search=cfg.index.hnsw_ef_search)
    outputs["config"] = save_config(cfg, checkpoint_dir / "config.yaml")
    build_metrics = {
        "num_documents": len(index.documents),
        "num_chunks": index.num_chunks,
        "embedded_documents": embedded_docs,
        "build_seconds": round(build_seconds, 3),
        "docs_per_second": round(embedded_docs / build_seconds, 3) if build_seconds > 0 and embedded_docs else 0.0,
    }
    metrics_logger.log_metrics(build_metrics, step=0, kind="build")
    log.info(
        "indexed %d documents as %d chunks (%s index) in %.1fs -> %s",
        build_metrics["num_documents"], build_metrics["num_chunks"], cfg.index.type, build_seconds, checkpoint_dir / INDEX_FILE,
    )

    summary_metrics: dict = dict(build_metrics)
    if not evaluate:  # metrics of a previous build would now describe another index
        for stale in (EVAL_METRICS_FILE, EVAL_PLOT_FILE):
            (checkpoint_dir / stale).unlink(missing_ok=True)
    if evaluate:
        evaluated = evaluate_modes(cfg, Retriever(index, cfg.retrieval), log)
        eval_metrics = evaluated["modes"]
        report = {
            "eval_file": str(cfg.data.eval_file),
            "top_k_values": cfg.retrieval.eval_top_k,
            "corpus_checksum": index.corpus_checksum,
            "embedding_model": encoder.name,
            "embedding_precision": encoder.precision,
            "index_type": cfg.index.type,
            **evaluated,
        }
        outputs["eval_metrics"] = atomic_write_json(checkpoint_dir / EVAL_METRICS_FILE, report)
        outputs["eval_plot"] = plot_retrieval_metrics(eval_metrics, cfg.retrieval.eval_top_k, checkpoint_dir / EVAL_PLOT_FILE)
        for mode, metrics in eval_metrics.items():
            metrics_logger.log_metrics({"mode": mode, **metrics}, step=0, kind="eval")
        primary = cfg.retrieval.mode if cfg.retrieval.mode in eval_metrics else next(iter(eval_metrics))
        summary_metrics.update(eval_metrics[primary])
        for mode, metrics in eval_metrics.items():
            if mode != primary:
                summary_metrics.update({f"{mode}/{name}": value for name, value in metrics.items()})
        if "hybrid_selected" in evaluated:  # test numbers of the fusion chosen on val
            summary_metrics["hybrid_selected"] = evaluated["hybrid_selected"]
            summary_metrics["test_queries"] = evaluated["split"]["test_queries"]
            summary_metrics.update({f"hybrid_selected/{name}": value for name, value in eval_metrics[evaluated["hybrid_selected"]].items()})
    metrics_logger.close()
    return {"metrics": summary_metrics, "outputs": {name: str(path) for name, path in outputs.items()}}


def _open_or_create_index(cfg: RagConfig, encoder: Encoder, resume: bool, log) -> RagIndex:
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    settings = dict(batch_size=cfg.training.batch_size, show_progress=cfg.training.show_progress)
    if resume and ((checkpoint_dir / STORE_FILE).exists() or (checkpoint_dir / METADATA_FILE).exists()):
        index = RagIndex.load(
            checkpoint_dir, embedding_model=cfg.model.embedding_model, embedding_dim=cfg.model.embedding_dim,
            encoder=encoder, writable=True, **settings,
        )
        built = {"chunk_size": index.chunk_size, "chunk_overlap": index.chunk_overlap, "index.type": index.index_config.type}
        wanted = {"chunk_size": cfg.model.chunk_size, "chunk_overlap": cfg.model.chunk_overlap, "index.type": cfg.index.type}
        for key in built:
            if built[key] != wanted[key]:
                index.close()
                raise CheckpointError(
                    f"{checkpoint_dir}: index was built with {key}={built[key]}, the config says {wanted[key]}: "
                    f"run without --resume to rebuild it"
                )
        index.set_search_params(nprobe=cfg.index.ivf_nprobe, ef_search=cfg.index.hnsw_ef_search)
        return index
    if resume:
        log.info("--resume: no index in %s yet, building from scratch", checkpoint_dir)
    return RagIndex(
        encoder, cfg.index, cfg.model.chunk_size, cfg.model.chunk_overlap, seed=cfg.system.seed, **settings
    )
