"""Fixtures of the RAG tests: the real MiniLM encoder (loaded once) and small real corpora."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from src.rag.config import RagIndexConfig
from src.rag.encoder import Encoder
from src.rag.indexer import RagIndex

# Five short documents on clearly different topics: small enough to check rankings by hand.
TINY_DOCS = [
    {"id": "cats", "text": "Cats are small domesticated felines. A cat purrs, hunts mice and sleeps most of the day.", "metadata": {"topic": "animals"}},
    {"id": "dogs", "text": "Dogs are loyal domesticated canines. A dog barks, fetches sticks and needs daily walks.", "metadata": {"topic": "animals"}},
    {"id": "python", "text": "Python is a programming language. Functions are defined with def and lists hold items.", "metadata": {"topic": "code"}},
    {"id": "bread", "text": "To bake bread, mix flour, water, yeast and salt, knead the dough, let it rise and bake it in a hot oven.", "metadata": {"topic": "food"}},
    {"id": "volcano", "text": "A volcano erupts lava, ash and gas from magma chambers deep below the crust of the earth.", "metadata": {"topic": "geology"}},
]

# Documents of the sample corpus used where a test needs real, multi-chunk documents
# but must stay fast: the shortest documents above this many characters.
SUBSET_SIZE = 16
SUBSET_MIN_CHARS = 2500


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    """all-MiniLM-L6-v2 from the offline package, on CPU."""
    return Encoder("sentence-transformers/all-MiniLM-L6-v2", device="cpu")


@pytest.fixture
def tiny_docs() -> list[dict]:
    """A fresh copy of ``TINY_DOCS`` (tests may modify it)."""
    return copy.deepcopy(TINY_DOCS)


@pytest.fixture
def tiny_index(encoder: Encoder) -> RagIndex:
    """A fresh flat index over ``TINY_DOCS`` (one chunk each)."""
    index = RagIndex(encoder, RagIndexConfig(type="flat"), chunk_size=64, chunk_overlap=8)
    index.add_documents(TINY_DOCS)
    return index


@pytest.fixture(scope="session")
def sample_subset_dir(sample_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``documents.jsonl`` + ``rag_eval.jsonl`` restricted to a few real sample documents.

    Picks the ``SUBSET_SIZE`` shortest documents longer than ``SUBSET_MIN_CHARS`` (so each
    spans several chunks) and the eval queries answered by them.
    """
    docs = [json.loads(line) for line in (sample_data_dir / "documents.jsonl").read_text().splitlines() if line.strip()]
    long_enough = sorted((d for d in docs if len(d["text"]) >= SUBSET_MIN_CHARS), key=lambda d: (len(d["text"]), d["id"]))
    chosen = long_enough[:SUBSET_SIZE]
    ids = {d["id"] for d in chosen}
    examples = [json.loads(line) for line in (sample_data_dir / "rag_eval.jsonl").read_text().splitlines() if line.strip()]
    examples = [ex for ex in examples if set(ex["relevant_docs"]) <= ids]
    out = tmp_path_factory.mktemp("rag_subset")
    (out / "documents.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chosen))
    (out / "rag_eval.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    return out


@pytest.fixture
def count_encoded(encoder, monkeypatch) -> list[str]:
    """Counts the texts the encoder embeds from here on."""
    seen: list[str] = []
    real_encode = encoder.encode

    def counting(texts, *args, **kwargs):
        seen.extend(texts)
        return real_encode(texts, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode", counting)
    return seen
