"""Open a built RAG index for search: what ``load_model("rag")`` calls."""

from __future__ import annotations

from pathlib import Path

import yaml

from src.core.config import validate_config
from src.rag.config import RagRetrievalConfig
from src.rag.indexer import RagIndex
from src.rag.retriever import Retriever


def load_retrieval_config(checkpoint_dir: str | Path) -> RagRetrievalConfig:
    """The ``retrieval`` section of the config saved beside the index, else the defaults."""
    path = Path(checkpoint_dir) / "config.yaml"
    if not path.is_file():
        return RagRetrievalConfig()
    raw = yaml.safe_load(path.read_text()) or {}
    return validate_config(raw.get("retrieval") or {}, RagRetrievalConfig, f"{path} (retrieval)")


def load_rag_index(
    checkpoint_dir: str | Path = "checkpoints/rag",
    device: str = "auto",
    embedding_model: str | None = None,
    embedding_dim: int | None = None,
    config: RagRetrievalConfig | None = None,
) -> Retriever:
    """Open the index in ``checkpoint_dir`` for search.

    Returns a :class:`Retriever` (``search``, ``search_batch``, ``embed_queries``,
    ``dense_scores``, ``keyword_ranking``, ``keyword_scores``; the index itself is ``.index``). Search
    defaults come from ``config`` or the ``config.yaml`` saved beside the index.
    ``embedding_model`` / ``embedding_dim``, when given, must match the index. A missing
    index is a ``NotTrainedError``; a damaged or mismatched one a ``CheckpointError``.
    """
    index = RagIndex.load(checkpoint_dir, device=device, embedding_model=embedding_model, embedding_dim=embedding_dim)
    return Retriever(index, config or load_retrieval_config(checkpoint_dir))
