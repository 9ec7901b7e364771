"""Prompts and responses as token ids, the same way in every RLHF stage.

A prompt-response pair is the sequence ``<|bos|> prompt_template(prompt) response <|eos|>``.
The prompt and the response are tokenized separately and concatenated, so the boundary
between them is exact: SFT knows which tokens are the response (its loss covers only
those), the reward model reads the same sequence, and PPO samples the response part from
the policy after exactly these prompt ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from src.data.prompts import is_grounded_prompt
from src.data.readers import PreferenceExample, SFTExample
from src.mamba.data import IGNORE_INDEX
from src.mamba.tokenizer import MambaTokenizer


def apply_template(template: str, prompt: str) -> str:
    """``template`` filled with ``prompt``; a retrieval-grounded prompt (``Context: ...
    Question: ...\nAnswer:``, see :mod:`src.data.prompts`) is left as it is, because the
    server and the LangChain graph send exactly that text to the model."""
    return prompt if is_grounded_prompt(prompt) else template.format(prompt=prompt)


@dataclass
class PromptFormat:
    """How text becomes ids: ``template`` (with ``{prompt}``) and the length limits."""

    tokenizer: MambaTokenizer
    template: str = "{prompt}\n"
    max_prompt_tokens: int = 64
    max_response_tokens: int = 64

    def prompt_ids(self, prompt: str) -> list[int]:
        """``<|bos|>`` + the templated prompt (:func:`apply_template`); a longer one than
        ``max_prompt_tokens`` keeps ``<|bos|>`` and its last tokens, so a grounded prompt's
        ``Question: ...\nAnswer:`` survives and the answer follows where it was trained to."""
        ids = self.tokenizer.encode(apply_template(self.template, prompt))
        if len(ids) >= self.max_prompt_tokens:
            ids = ids[len(ids) - (self.max_prompt_tokens - 1) :]
        return [self.tokenizer.bos_id] + ids

    def response_ids(self, response: str) -> list[int]:
        """The response + ``<|eos|>``; a response longer than ``max_response_tokens`` is cut
        and gets no ``<|eos|>`` (it did not end there)."""
        ids = self.tokenizer.encode(response)
        if len(ids) >= self.max_response_tokens:
            return ids[: self.max_response_tokens]
        return ids + [self.tokenizer.eos_id]


class SFTDataset(Dataset):
    """Item ``i``: ``(prompt_ids, response_ids)`` of one ``{prompt, response}`` example."""

    def __init__(self, examples: Sequence[SFTExample], fmt: PromptFormat) -> None:
        self.items = [(fmt.prompt_ids(e.prompt), fmt.response_ids(e.response)) for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.items[index]

    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in self.items]


class PreferenceDataset(Dataset):
    """Item ``i``: ``(prompt_ids, chosen_ids, rejected_ids)`` of one preference pair."""

    def __init__(self, examples: Sequence[PreferenceExample], fmt: PromptFormat) -> None:
        self.items = [
            (fmt.prompt_ids(e.prompt), fmt.response_ids(e.chosen), fmt.response_ids(e.rejected)) for e in examples
        ]

    @classmethod
    def from_ids(cls, items: Sequence[tuple[list[int], list[int], list[int]]]) -> "PreferenceDataset":
        """The dataset of pairs already in token ids (e.g. sampled answers)."""
        dataset = cls.__new__(cls)
        dataset.items = list(items)
        return dataset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[list[int], list[int], list[int]]:
        return self.items[index]

    def lengths(self) -> list[int]:
        return [len(p) + max(len(c), len(r)) for p, c, r in self.items]


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, T), lengths (B,))`` with every sequence right-padded to the longest.
    Right padding is harmless for a causal model: no position reads later ones."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
    return ids, lengths


def collate_sft(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` (B, T-1) and next-token ``labels`` (B, T-1); every label that is not a
    response token (prompt, padding) is ``IGNORE_INDEX``, so the loss covers responses only."""
    ids, _ = pad_right([p + r for p, r in items], pad_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (prompt, response) in enumerate(items):
        labels[row, len(prompt) : len(prompt) + len(response)] = torch.tensor(response, dtype=torch.long)
    return {"input_ids": ids[:, :-1].contiguous(), "labels": labels[:, 1:].contiguous()}


def collate_preferences(items: list[tuple[list[int], list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B sequences: rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1``
    prompt+rejected; ``lengths`` (2B,) locate each sequence's last token."""
    sequences = [p + c for p, c, _ in items] + [p + r for p, _, r in items]
    ids, lengths = pad_right(sequences, pad_id)
    return {"input_ids": ids, "lengths": lengths}


@torch.no_grad()
def evaluate_in_batches(
    model: torch.nn.Module,
    dataset: Dataset,
    collate: Callable[[list], dict[str, torch.Tensor]],
    eval_step: Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, list]],
    batch_size: int = 32,
) -> dict[str, list]:
    """Run ``eval_step`` (the one the engine uses) over ``dataset`` in order, outside the
    engine, and return its per-example outputs concatenated. The model's mode is restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: dict[str, list] = {}
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        for key, values in eval_step(model, {k: v.to(device) for k, v in batch.items()}).items():
            outputs.setdefault(key, []).extend(values)
    model.train(was_training)
    return outputs
