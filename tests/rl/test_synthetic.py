"""src/rl/synthetic.py: deterministic per seed, never a document's own text, thinned as configured."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.data.readers import Document
from src.rl.synthetic import STOPWORDS, WordNeighbors, document_sentences, synthetic_queries, thin_words

DOCS = [
    Document(id=f"doc{i}", text=f"# Title number {i}\n\n" + " ".join(
        f"Sentence {j} of document {i} explains how widgets{i} connect gadgets{j} over serial cables." for j in range(6)))
    for i in range(8)
] + [Document(id="short", text="Exactly one sentence with seven words here.")]


def test_same_seed_same_queries_other_seed_other_queries():
    a = synthetic_queries(DOCS, "sentence", keep_shared=0.5, per_document=2, seed=3)
    b = synthetic_queries(list(reversed(DOCS)), "sentence", keep_shared=0.5, per_document=2, seed=3)
    c = synthetic_queries(DOCS, "sentence", keep_shared=0.5, per_document=2, seed=4)
    assert sorted((q.query, tuple(q.relevance)) for q in a) == sorted((q.query, tuple(q.relevance)) for q in b)  # order-independent
    assert [q.query for q in a] != [q.query for q in c]
    assert len(a) == 2 * 8 + 1 and all(list(q.relevance.values()) == [1] for q in a)


def test_no_query_equals_its_document_and_words_are_thinned():
    for keep in (0.3, 0.5, 1.0):
        queries = synthetic_queries(DOCS, "sentence", keep_shared=keep, per_document=3, seed=0)
        texts = {d.id: d.text for d in DOCS}
        for q in queries:
            (doc_id,) = q.relevance
            assert q.query.strip().lower() != texts[doc_id].strip().lower()
            assert len(q.query.split()) >= 2
    # the one-sentence document: with keep_shared 1 the query would be the whole document -> dropped
    assert not any("short" in q.relevance for q in synthetic_queries(DOCS, "sentence", keep_shared=1.0, seed=0))
    full = synthetic_queries(DOCS[:1], "sentence", keep_shared=1.0, per_document=6, seed=0)
    assert sorted(q.query for q in full) == sorted(document_sentences(DOCS[0].text))  # keep 1: whole sentences
    thinned = synthetic_queries(DOCS, "sentence", keep_shared=0.3, per_document=6, seed=0)
    content = lambda text: [w for w in text.split() if w.lower().strip(".,") not in STOPWORDS]  # noqa: E731
    kept = np.mean([len(content(q.query)) for q in thinned]) / np.mean([len(content(s)) for d in DOCS[:8] for s in document_sentences(d.text)])
    assert 0.2 < kept < 0.45  # about keep_shared of the content words survive (at least 2 each)


def test_thin_words_keeps_stopwords_and_at_least_two_content_words():
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = thin_words("the parser of the file reads every header line", 0.01, rng).split()
        assert [w for w in out if w in STOPWORDS] == ["the", "of", "the"]
        assert len([w for w in out if w not in STOPWORDS]) == 2


def test_title_source():
    queries = synthetic_queries(DOCS, "title", keep_shared=1.0, seed=0)
    assert {q.query for q in queries} == {f"Title number {i}" for i in range(8)}


def test_substitution_replaces_dropped_words_with_related_ones():
    """``substitute``: a dropped content word becomes one of its embedding neighbours (never an
    inflection of it); deterministic per seed; ``substitute == 0`` gives the thinning-only
    queries unchanged, bit for bit."""
    vocab = {w: i for i, w in enumerate(["folder", "directory", "dirs", "banana", "list", "table", "reads", "the"])}
    vectors = torch.zeros(len(vocab), 4)
    vectors[[0, 1, 2], 0] = torch.tensor([1.0, 1.0, 0.9])  # folder ~ directory ~ dirs
    vectors[[4, 5], 1] = 1.0                                 # list ~ table
    vectors[3, 2] = vectors[6, 3] = vectors[7, 3] = 1.0
    vectors += 0.01 * torch.arange(len(vocab)).unsqueeze(1)
    neighbours = WordNeighbors(vocab, vectors, top=2)
    assert neighbours.neighbours("directory")[0] == "folder" and len(neighbours.neighbours("directory")) == 2
    assert neighbours.neighbours("list")[0] == "table" and neighbours.neighbours("the") == []  # stopwords are not in it
    assert "dirs" not in neighbours.neighbours("directory") and "directory" not in neighbours.neighbours("directory")
    assert neighbours.neighbours("unknownword") == []

    rng = np.random.default_rng(0)
    out = thin_words("the directory reads the list", 0.01, rng, substitute=1.0, neighbours=neighbours).split()
    assert len(out) == 5 and out[0] == out[3] == "the"  # every dropped word had neighbours: none removed
    assert {"directory", "list", "reads"} - set(out)  # at least one of them was replaced...
    assert set(out) <= {"the", "directory", "reads", "list", "folder", "table", "banana", "dirs"}  # ...by a vocabulary word

    plain = synthetic_queries(DOCS, "sentence", keep_shared=0.5, per_document=2, seed=3)
    assert [q.query for q in synthetic_queries(DOCS, "sentence", 0.5, 2, 3, substitute=0.0, neighbours=neighbours)] == [q.query for q in plain]
    a = synthetic_queries(DOCS, "sentence", 0.5, 2, 3, substitute=0.5, neighbours=neighbours)
    assert [q.query for q in a] == [q.query for q in synthetic_queries(DOCS, "sentence", 0.5, 2, 3, substitute=0.5, neighbours=neighbours)]
    with pytest.raises(ValueError, match="needs neighbours"):
        synthetic_queries(DOCS, substitute=0.5)


def test_lead_source_takes_the_first_sentences_in_order():
    queries = synthetic_queries(DOCS[:3], "lead", keep_shared=1.0, per_document=2, seed=5)
    for i in range(3):
        first_two = document_sentences(DOCS[i].text)[:2]
        assert [q.query for q in queries if q.relevance == {f"doc{i}": 1}] == first_two
    thinned = synthetic_queries(DOCS[:3], "lead", keep_shared=0.3, per_document=1, seed=5)
    assert all(len(q.query.split()) < len(document_sentences(DOCS[int(q.query_id.split(":")[1][3:])].text)[0].split()) for q in thinned)
