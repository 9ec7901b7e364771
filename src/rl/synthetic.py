"""Training queries made from the corpus itself, for a corpus nobody has written questions for.

Each query is a piece of a document (its title, or one of its sentences) with the document
as its one relevant answer. Taken as is, such a query is trivial for BM25 (every word is in
the answer), so the policy would only learn "always BM25". Hence *thinning*: each content
word of the query (not a stopword) is kept with probability ``keep_shared`` (at least
``MIN_KEPT_WORDS`` are kept), the way a person remembers a few of a page's words, not its
exact sentence. With ``substitute`` > 0 a content word the thinning drops is, with that
chance, replaced by a related word instead (:class:`WordNeighbors`: a nearest neighbour in the
embedding model's word-piece embeddings, "directory" -> "folder"), the way a person asks in their
own words: the query keeps its meaning for the dense retriever and loses the exact match BM25
needs. Which source, how much thinning and substitution work best is measured in
``bench/retrieval_policy.py`` (README, RL section), not assumed.

Deterministic per seed: every document draws from its own generator seeded with
``(seed, sha256(doc id))``, so the same seed gives the same queries whatever the order or
number of the other documents. No query equals its document's text.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal, Sequence

import numpy as np
import torch

from src.data.readers import Document
from src.rag.eval import EvalQuery

SyntheticSource = Literal["title", "sentence", "lead"]
MIN_KEPT_WORDS = 2
MIN_SENTENCE_WORDS = 6
MAX_SENTENCE_WORDS = 30

_PUNCTUATION = ".,;:!?()[]\"'"  # stripped from a word before it is looked up
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
# Common English function words (the kind BM25 indexes drop): never thinned, never counted.
STOPWORDS = frozenset("""
a an the of to in for and or is are be been by with from on as at it its this that these those which what how do does
can if into when not where there their them they then than so such via any all some each one i me my you your we our
us was were will would should could may might must has have had no but also only about over after before under up out
""".split())


def _doc_seed(seed: int, doc_id: str) -> list[int]:
    return [int(seed), int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")]


def document_title(doc: Document) -> str:
    """``metadata["title"]`` when set, else the document's first non-empty line without markup."""
    title = str((doc.metadata or {}).get("title") or "")
    if not title:
        first = next((line for line in doc.text.splitlines() if line.strip()), "")
        title = first.strip().lstrip("#").strip()
    return title


def document_sentences(text: str) -> list[str]:
    """The sentences of ``text`` with ``MIN_SENTENCE_WORDS`` to ``MAX_SENTENCE_WORDS`` words, whitespace collapsed."""
    out = []
    for piece in _SENTENCE_END.split(text):
        sentence = " ".join(piece.split())
        words = sentence.split()
        letters = sum(1 for w in words if any(c.isalpha() for c in w))
        if MIN_SENTENCE_WORDS <= len(words) <= MAX_SENTENCE_WORDS and letters >= 0.7 * len(words):
            out.append(sentence)
    return out


class WordNeighbors:
    """Related words from an embedding model's input word-piece embeddings: for a word that is
    one whole word-piece of the vocabulary, its ``top`` nearest whole-word pieces by cosine (3+
    letters, no stopword, not sharing its first 3 letters, so no inflection of it)."""

    def __init__(self, vocab: dict[str, int], embeddings: torch.Tensor, top: int = 5) -> None:
        self.top = top
        self.words = [w for w in vocab if re.fullmatch(r"[a-z]{3,}", w) and w not in STOPWORDS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.vectors = torch.nn.functional.normalize(embeddings[[vocab[w] for w in self.words]].float(), dim=1)
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_pretrained(cls, name: str, top: int = 5) -> "WordNeighbors":
        """From a hub id, a local folder or ``minilm-local`` (the RAG index's embedding model)."""
        from transformers import AutoModel, AutoTokenizer

        from src.core.hub import resolve_pretrained

        path = resolve_pretrained(name)
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
        return cls(tokenizer.get_vocab(), model.get_input_embeddings().weight.detach(), top)

    def neighbours(self, word: str) -> list[str]:
        key = word.lower()
        if key not in self._cache:
            found: list[str] = []
            if key in self.index:
                scores = self.vectors @ self.vectors[self.index[key]]
                for i in scores.topk(min(len(self.words), 10 * self.top + 1)).indices.tolist():
                    other = self.words[i]
                    if other[:3] != key[:3] and key not in other and other not in key:
                        found.append(other)
                    if len(found) == self.top:
                        break
            self._cache[key] = found
        return self._cache[key]


def thin_words(
    text: str, keep_shared: float, rng: np.random.Generator, substitute: float = 0.0, neighbours: WordNeighbors | None = None,
) -> str:
    """``text`` with each content word kept with probability ``keep_shared`` (stopwords always
    kept; at least ``MIN_KEPT_WORDS`` content words stay, topped up at random if needed); a
    dropped word is replaced by one of its ``neighbours`` with probability ``substitute``
    (when it has any), else removed. ``substitute == 0`` draws nothing more from ``rng``."""
    words = text.split()
    content = [i for i, w in enumerate(words) if w.lower().strip(_PUNCTUATION) not in STOPWORDS]
    keep = rng.random(len(content)) < keep_shared
    missing = min(MIN_KEPT_WORDS, len(content)) - int(keep.sum())
    if missing > 0:  # top up with randomly chosen dropped words
        keep[rng.permutation(np.flatnonzero(~keep))[:missing]] = True
    dropped = [i for i, kept in zip(content, keep) if not kept]
    replaced: dict[int, str] = {}
    if substitute > 0 and neighbours is not None:
        for i in dropped:
            if rng.random() < substitute:
                options = neighbours.neighbours(words[i].strip(_PUNCTUATION))
                if options:
                    replaced[i] = options[int(rng.integers(len(options)))]
    gone = set(dropped) - set(replaced)
    return " ".join(replaced.get(i, w) for i, w in enumerate(words) if i not in gone)


def synthetic_queries(
    documents: Sequence[Document],
    source: SyntheticSource = "sentence",
    keep_shared: float = 0.5,
    per_document: int = 1,
    seed: int = 0,
    max_queries: int | None = None,
    substitute: float = 0.0,
    neighbours: WordNeighbors | None = None,
) -> list[EvalQuery]:
    """Up to ``per_document`` queries per document (``source``: its title, random sentences of
    it or its first sentences (``lead``), thinned by :func:`thin_words`, dropped words replaced by ``neighbours`` with probability
    ``substitute``), each with the document as its relevant answer;
    ``max_queries`` keeps a seeded random subset. Deterministic per ``seed``."""
    if not 0.0 < keep_shared <= 1.0:
        raise ValueError(f"keep_shared must be in (0, 1] (got {keep_shared})")
    if substitute > 0 and neighbours is None:
        raise ValueError("substitute > 0 needs neighbours (WordNeighbors of the embedding model)")
    queries: list[EvalQuery] = []
    for doc in documents:
        rng = np.random.default_rng(_doc_seed(seed, doc.id))
        if source == "title":
            pieces = [document_title(doc)]
        elif source == "lead":  # the document's first sentences: what it is about, as a summary line says
            pieces = document_sentences(doc.text)[:per_document]
        else:
            sentences = document_sentences(doc.text)
            pieces = [sentences[i] for i in sorted(rng.permutation(len(sentences))[:per_document])]
        seen: set[str] = set()
        for piece in pieces:
            query = thin_words(piece, keep_shared, rng, substitute, neighbours).strip()
            if len(query.split()) < 2 or query in seen or query.lower() == doc.text.strip().lower():
                continue
            seen.add(query)
            queries.append(EvalQuery(query_id=f"synthetic:{doc.id}:{len(seen) - 1}", query=query, relevance={doc.id: 1}))
    if max_queries is not None and len(queries) > max_queries:
        keep = np.sort(np.random.default_rng(seed).permutation(len(queries))[:max_queries])
        queries = [queries[i] for i in keep]
    return queries
