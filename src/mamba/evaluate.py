"""How good a Mamba LM is: perplexity of a text, and the baselines it must beat."""

from __future__ import annotations

import numpy as np
import torch

from src.mamba.generate import token_logprobs
from src.mamba.model import MambaLM
from src.mamba.tokenizer import MambaTokenizer


def unigram_cross_entropy(train_stream: torch.Tensor, eval_labels: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``eval_labels`` of a unigram model of ``train_stream``.

    The baseline a language model must beat: each token's probability is its add-one
    smoothed frequency in the training stream, ignoring all context.
    """
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs = torch.log(counts / counts.sum())
    return float(-log_probs[eval_labels].mean())


class KneserNeyTrigram:
    """An interpolated Kneser-Ney 3-gram LM over token ids (Chen & Goodman 1998, one absolute
    discount per order, ``D = n1 / (n1 + 2 n2)``), counted with NumPy on a token stream.

    The cheap model a neural LM must beat once context matters:

    * ``P3(w|u v) = max(c(uvw) - D3, 0) / c(uv.) + D3 N1+(uv.) / c(uv.) * P2(w|v)``;
    * ``P2(w|v) = max(N1+(.vw) - D2, 0) / N1+(.v.) + D2 N1+(v.)' / N1+(.v.) * P1(w)`` with
      continuation counts (how many distinct words precede ``vw``);
    * ``P1(w) = max(N1+(.w) - D1, 0) / N1+(..) + D1 N1+(.)' / N1+(..) / V``, interpolated with the
      uniform distribution so that a token never seen in training keeps a probability.

    An unseen context falls back to the lower order. The stream's first tokens see a
    start-of-stream symbol as their missing context. Every conditional distribution sums to 1
    over the ``vocab_size`` tokens.
    """

    def __init__(self, train_stream: torch.Tensor, vocab_size: int) -> None:
        tokens = np.asarray(train_stream.tolist() if isinstance(train_stream, torch.Tensor) else train_stream, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        self.vocab_size = V = vocab_size
        self.symbols = S = V + 1  # + the start-of-stream symbol V
        padded = np.concatenate([[V, V], tokens])
        # trigram types and counts; every bigram of the stream ends a trigram (thanks to the padding)
        self.tri_keys, self.tri_counts = np.unique(padded[:-2] * S * S + padded[1:-1] * S + padded[2:], return_counts=True)
        self.d3 = _discount(self.tri_counts)
        # highest order: c(uv.) and N1+(uv.) per context uv
        self.ctx_keys, ctx_index = np.unique(self.tri_keys // S, return_inverse=True)
        self.ctx_counts = np.bincount(ctx_index, weights=self.tri_counts)
        self.ctx_types = np.bincount(ctx_index).astype(np.float64)
        # middle order: continuation counts N1+(.vw)
        self.bi_keys, self.bi_cont = np.unique(self.tri_keys % (S * S), return_counts=True)
        self.d2 = _discount(self.bi_cont)
        v_of_bigram = self.bi_keys // S
        self.v_denominator = np.bincount(v_of_bigram, weights=self.bi_cont, minlength=S)
        self.v_types = np.bincount(v_of_bigram, minlength=S).astype(np.float64)
        # lowest order: N1+(.w), interpolated with uniform
        w_cont = np.bincount(self.bi_keys % S, minlength=S)[:V].astype(np.float64)
        self.d1 = _discount(w_cont[w_cont > 0].astype(np.int64))
        total, types = w_cont.sum(), float((w_cont > 0).sum())
        self.p1 = np.maximum(w_cont - self.d1, 0.0) / total + self.d1 * types / total / V

    def probabilities(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """``P(w | u v)`` for arrays of token ids (``V`` = vocab_size stands for "before the stream")."""
        S = self.symbols
        u, v, w = (np.asarray(x, dtype=np.int64) for x in (u, v, w))
        p1 = self.p1[w]
        cont = _lookup(self.bi_keys, self.bi_cont, v * S + w).astype(np.float64)
        denominator = self.v_denominator[v]
        safe = np.maximum(denominator, 1.0)
        p2 = np.where(
            denominator > 0, np.maximum(cont - self.d2, 0.0) / safe + self.d2 * self.v_types[v] / safe * p1, p1
        )
        ctx = u * S + v
        c_ctx = _lookup(self.ctx_keys, self.ctx_counts, ctx)
        n_ctx = _lookup(self.ctx_keys, self.ctx_types, ctx)
        c_tri = _lookup(self.tri_keys, self.tri_counts, ctx * S + w).astype(np.float64)
        safe = np.maximum(c_ctx, 1.0)
        return np.where(c_ctx > 0, np.maximum(c_tri - self.d3, 0.0) / safe + self.d3 * n_ctx / safe * p2, p2)

    def cross_entropy(self, stream: torch.Tensor) -> float:
        """Mean negative log-probability (nats/token) of ``stream[1:]``, each token given the two
        before it in ``stream`` (the first label sees the start-of-stream symbol and ``stream[0]``):
        the labels the Mamba model's val loss is computed on."""
        tokens = np.asarray(stream.tolist() if isinstance(stream, torch.Tensor) else stream, dtype=np.int64)
        padded = np.concatenate([[self.vocab_size], tokens])
        probs = self.probabilities(padded[:-2], padded[1:-1], padded[2:])
        return float(-np.log(probs).mean())


def _discount(counts: np.ndarray) -> float:
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    return n1 / (n1 + 2 * n2) if n1 + n2 else 0.5


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``values`` at the positions of ``queries`` in the sorted ``keys``; 0 where absent."""
    pos = np.clip(np.searchsorted(keys, queries), 0, max(0, len(keys) - 1))
    found = (keys[pos] == queries) if len(keys) else np.zeros(queries.shape, dtype=bool)
    return np.where(found, values[pos] if len(keys) else 0, 0)


def kneser_ney_cross_entropy(train_stream: torch.Tensor, eval_stream: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``eval_stream[1:]`` of an interpolated Kneser-Ney 3-gram
    LM counted on ``train_stream`` (:class:`KneserNeyTrigram`): the count-based baseline."""
    return KneserNeyTrigram(train_stream, vocab_size).cross_entropy(eval_stream)


def perplexity(model: MambaLM, tokenizer: MambaTokenizer, text: str) -> float:
    """Perplexity of ``text`` read as one document (``<|bos|> text <|eos|>``)."""
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]])
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        return float(torch.exp(-token_logprobs(model, ids).mean()))


__all__ = ["KneserNeyTrigram", "kneser_ney_cross_entropy", "perplexity", "unigram_cross_entropy"]
