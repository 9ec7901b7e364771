"""Text generation and scoring with a trained :class:`MambaLM`.

Generation reads the prompt once with the chunked scan (prefill), then produces each new
token with :meth:`MambaLM.step` from the fixed-size recurrent state: the cost of a new token
does not depend on the prompt length (nothing like a growing key/value cache).

For RLHF-style training: :func:`token_logprobs` (differentiable log-probabilities of a
sequence's tokens) and ``model(ids, compute_logits=False).hidden_states`` (the backbone's
final hidden states, ``model.args.d_model`` wide) for value or reward heads.
"""

from __future__ import annotations

from typing import Sequence

import torch

from src.mamba.model import MambaCache, MambaLM
from src.mamba.tokenizer import MambaTokenizer


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of ``logits`` (batch, vocab): greedy when ``temperature <= 0``, else
    nucleus sampling (the smallest set of tokens whose probability reaches ``top_p``)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is below top_p (the most likely token always stays).
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: MambaLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
) -> list[list[int]]:
    """Continue each token-id prompt; returns the new ids per prompt (ending at ``eos_id``
    when it is sampled). Prompts may have different lengths: each is prefilled on its own,
    then all are decoded together, one token per step. The same ``seed`` gives the same output.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    caches, logits = [], []
    for prompt in prompts:
        out = model(torch.tensor([list(prompt)], dtype=torch.long, device=device), return_cache=True)
        caches.append(out.cache)
        logits.append(out.logits[:, -1])
    cache = MambaCache.concat(caches)
    next_logits = torch.cat(logits)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        tokens = sample_next(next_logits, temperature, top_p, generator)
        for row, token in enumerate(tokens.tolist()):
            if not finished[row]:
                outputs[row].append(token)
                finished[row] = token == eos_id
        if all(finished) or step == max_new_tokens - 1:
            break
        next_logits, cache = model.step(tokens, cache)
    model.train(was_training)
    return outputs


def generate(
    model: MambaLM,
    tokenizer: MambaTokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int | None = None,
) -> str:
    """The model's continuation of ``prompt`` as text (the prompt itself not included).

    The prompt is read as the start of a document (``<|bos|>`` first); generation stops
    after ``max_new_tokens`` or at ``<|eos|>``. ``temperature=0`` is greedy decoding.
    """
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    new = generate_ids(model, [ids], max_new_tokens, temperature, top_p, seed, eos_id=tokenizer.eos_id)[0]
    return tokenizer.decode(new)


def token_logprobs(model: MambaLM, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens before t) for t = 1..T-1 of ``input_ids`` (batch, T):
    a (batch, T-1) tensor, differentiable (for policy-gradient losses). Right padding only
    affects the padded positions."""
    logits = model(input_ids).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


__all__ = ["generate", "generate_ids", "sample_next", "token_logprobs"]
