"""The Mamba LM's count-based baselines (src/mamba/evaluate.py): the interpolated
Kneser-Ney 3-gram against a direct, loop-by-loop reading of its formulas, its normalisation,
and its place between the unigram baseline and perfect prediction on real text."""

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from src.data.readers import read_documents
from src.mamba.data import pack_documents
from src.mamba.evaluate import KneserNeyTrigram, kneser_ney_cross_entropy, unigram_cross_entropy
from src.mamba.tokenizer import MambaTokenizer


def _reference_kn(train: list[int], vocab: int):
    """Interpolated Kneser-Ney 3-gram written out with dicts (START = vocab)."""
    start = vocab
    seq = [start, start] + train
    tri = Counter(zip(seq, seq[1:], seq[2:]))

    def discount(counts):
        n1, n2 = sum(1 for c in counts if c == 1), sum(1 for c in counts if c == 2)
        return n1 / (n1 + 2 * n2) if n1 + n2 else 0.5

    d3 = discount(tri.values())
    left_of_bigram = defaultdict(set)
    for u, v, w in tri:
        left_of_bigram[(v, w)].add(u)
    cont2 = {k: len(s) for k, s in left_of_bigram.items()}
    d2 = discount(cont2.values())
    left_of_word = defaultdict(set)
    for v, w in cont2:
        left_of_word[w].add(v)
    cont1 = {w: len(s) for w, s in left_of_word.items()}
    d1 = discount(cont1.values())
    total1 = sum(cont1.values())

    def p1(w):
        return max(cont1.get(w, 0) - d1, 0) / total1 + d1 * len(cont1) / total1 / vocab

    def p2(v, w):
        denominator = sum(c for (a, _), c in cont2.items() if a == v)
        if denominator == 0:
            return p1(w)
        types = sum(1 for (a, _) in cont2 if a == v)
        return max(cont2.get((v, w), 0) - d2, 0) / denominator + d2 * types / denominator * p1(w)

    def p3(u, v, w):
        c_ctx = sum(c for (a, b, _), c in tri.items() if (a, b) == (u, v))
        if c_ctx == 0:
            return p2(v, w)
        types = sum(1 for (a, b, _) in tri if (a, b) == (u, v))
        return max(tri.get((u, v, w), 0) - d3, 0) / c_ctx + d3 * types / c_ctx * p2(v, w)

    return p3


def test_kneser_ney_matches_the_formulas_and_sums_to_one():
    rng = np.random.default_rng(0)
    vocab = 40
    train = rng.integers(0, 36, 300).tolist()  # tokens 36..39 never seen in training
    model = KneserNeyTrigram(torch.tensor(train), vocab)
    reference = _reference_kn(train, vocab)
    for u, v in [(vocab, vocab), (vocab, train[0]), (train[5], train[6]), (3, 39), (38, 39)]:
        probs = model.probabilities(np.full(vocab, u), np.full(vocab, v), np.arange(vocab))
        assert probs.sum() == pytest.approx(1.0, abs=1e-12)
        assert (probs > 0).all()  # unseen tokens keep a probability
        assert probs == pytest.approx([reference(u, v, w) for w in range(vocab)], abs=1e-12)
    held_out = rng.integers(0, 40, 50).tolist()
    expected = -np.mean([math.log(reference(*ctx, w)) for ctx, w in zip(zip([vocab] + held_out, held_out), held_out[1:])])
    assert kneser_ney_cross_entropy(torch.tensor(train), torch.tensor(held_out), vocab) == pytest.approx(expected, abs=1e-12)


def test_kneser_ney_beats_unigram_on_real_text_and_is_near_zero_on_its_training_text(sample_data_dir):
    train_docs = read_documents(sample_data_dir / "lm_train.jsonl")[:40]
    val_docs = read_documents(sample_data_dir / "lm_val.jsonl")[:10]
    tokenizer = MambaTokenizer.train((d.text for d in train_docs), 500, 2)
    train, val = pack_documents(train_docs, tokenizer), pack_documents(val_docs, tokenizer)
    kn3 = kneser_ney_cross_entropy(train, val, tokenizer.vocab_size)
    unigram = unigram_cross_entropy(train, val[1:], tokenizer.vocab_size)
    assert kn3 < unigram - 0.5, (kn3, unigram)  # context helps: several times lower perplexity
    assert kneser_ney_cross_entropy(train, train, tokenizer.vocab_size) < kn3 - 1.0  # it memorises what it counted
