"""The sentence-transformers embedding model behind the index: loading and encoding.

Embeddings are float32 and L2-normalised, so FAISS inner product is cosine similarity.
"""

from __future__ import annotations

import numpy as np

from src.core.errors import ConfigError
from src.core.hub import hub_error, resolve_pretrained
from src.core.runtime import resolve_device


class Encoder:
    """A sentence-transformers model that turns texts into normalised float32 vectors.

    ``name`` is a hub id, a local folder or ``minilm-local`` (resolved offline by
    :func:`src.core.hub.resolve_pretrained`). ``tokenizer``, ``max_seq_length``,
    ``dim`` and ``num_special_tokens`` describe what the model reads and writes.
    """

    def __init__(self, name: str, device: str = "auto", key: str = "model.embedding_model") -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.device = str(resolve_device(device))
        try:
            self.model = SentenceTransformer(resolve_pretrained(name, key), device=self.device)
        except Exception as err:  # offline hub miss, bad folder, ...
            raise hub_error(name, key, err) from None
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"{key}: '{name}' has no fast tokenizer; chunking needs token offsets")
        self.max_seq_length = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension())
        self.num_special_tokens = len(self.tokenizer("", add_special_tokens=True)["input_ids"])

    def encode(self, texts: list[str], batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        """``(len(texts), dim)`` float32, each row of unit L2 norm."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
