"""How good a Mamba LM is: perplexity of a text, and the baselines it must beat."""

from __future__ import annotations

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


def perplexity(model: MambaLM, tokenizer: MambaTokenizer, text: str) -> float:
    """Perplexity of ``text`` read as one document (``<|bos|> text <|eos|>``)."""
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]])
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        return float(torch.exp(-token_logprobs(model, ids).mean()))


__all__ = ["perplexity", "unigram_cross_entropy"]
