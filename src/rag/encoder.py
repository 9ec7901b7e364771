"""The sentence-transformers embedding model behind the index: loading and encoding.

Embeddings are float32 and L2-normalised, so FAISS inner product is cosine similarity.
``precision="bf16"`` embeds documents (``encode(..., documents=True)``: what the index
stores) under bf16 autocast, the vectors still float32: on a CPU with native bf16
(AVX512-BF16 / AMX) MiniLM embeds 2.5x faster, at a cosine of 0.99997 or more to the fp32
vectors (README, RAG index). ``auto`` is bf16 where the device computes it natively, else
fp32. Queries and ``/embeddings`` are always fp32: in bf16 a text's vector moves by ~1e-3
with the texts it is batched with, and a search must not depend on its neighbours in a batch.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Literal

import numpy as np
import torch

from src.core.errors import ConfigError
from src.core.hub import hub_error, resolve_pretrained
from src.core.runtime import resolve_device, resolve_inference_precision


class Encoder:
    """A sentence-transformers model that turns texts into normalised float32 vectors.

    ``name`` is a hub id, a local folder or ``minilm-local`` (resolved offline by
    :func:`src.core.hub.resolve_pretrained`). ``tokenizer``, ``max_seq_length``,
    ``dim`` and ``num_special_tokens`` describe what the model reads and writes.
    """

    def __init__(
        self, name: str, device: str = "auto", key: str = "model.embedding_model",
        precision: Literal["auto", "fp32", "bf16"] = "fp32",
    ) -> None:
        from sentence_transformers import SentenceTransformer

        if precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"model.embedding_precision: '{precision}' is not one of auto, fp32, bf16")
        self.name = name
        self.device = str(resolve_device(device))
        self.requested_precision = precision
        self.precision = resolve_inference_precision(precision, torch.device(self.device))
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

    def with_precision(self, precision: str) -> "Encoder":
        """This encoder (same weights) running at ``precision`` (``fp32`` / ``bf16``)."""
        if precision == self.precision:
            return self
        other = copy.copy(self)
        other.precision = other.requested_precision = precision
        return other

    def encode(self, texts: list[str], batch_size: int = 32, show_progress: bool = False, documents: bool = False) -> np.ndarray:
        """``(len(texts), dim)`` float32, each row of unit L2 norm; ``documents``: texts for
        the index, embedded at :attr:`precision` (else fp32, as every query)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        autocast = (
            torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
            if documents and self.precision == "bf16" else contextlib.nullcontext()
        )
        with autocast:
            vectors = self.model.encode(
                list(texts),
                batch_size=batch_size,
                show_progress_bar=show_progress,
                convert_to_tensor=True,
                normalize_embeddings=True,
            )
        return np.ascontiguousarray(vectors.float().cpu().numpy(), dtype=np.float32)
