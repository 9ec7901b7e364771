"""Build the RAG index over the documents, and optionally evaluate retrieval.

    python -m src.scripts.train_rag_indexer --config configs/rag_indexer.yaml [--evaluate]
        [--device cpu|cuda|auto] [--resume] [key.sub=value ...]

The recipe (:mod:`src.rag.train`): load the documents, load the embedding model, chunk + embed + index
(``--resume``: reuse the saved index and embed only new or changed documents, dropping
removed ones), save ``faiss.index`` + ``metadata.json`` + the effective config in
``paths.checkpoint_dir``; with ``--evaluate``, score every mode of
``retrieval.eval_modes`` on ``data.eval_file``, print a table and write
``eval_metrics.json`` / ``eval_metrics.png`` beside the index.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from src.core.cli import add_common_args, overrides_with_device, run_cli
from src.core.config import load_config
from src.rag.config import RagConfig
from src.rag.train import run

DEFAULT_CONFIG = "configs/rag_indexer.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.scripts.train_rag_indexer", description=__doc__.split("\n\n")[0])
    add_common_args(parser, DEFAULT_CONFIG, evaluate=True)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, load the config, build (and evaluate) the index; returns the run's summary."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, RagConfig, overrides_with_device(args))
    return run(cfg, resume=args.resume, evaluate=args.evaluate)


__all__ = ["build_parser", "main", "run"]

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
