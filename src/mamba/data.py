"""Documents -> one token stream -> training windows of ``max_length`` tokens.

Every document becomes ``<|bos|> tokens <|eos|>``; the documents are packed one after another
into a single stream, which is cut into consecutive windows. Window ``i`` holds stream
positions ``[i*T, (i+1)*T]`` (T+1 tokens: T inputs and the T next tokens as labels), so
consecutive windows overlap by one token and every token of the stream after the first is
a label exactly once: a long document is split across windows, nothing is dropped. The
last window is padded (padding is not a label).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.utils.data import Dataset

from src.core.errors import DataError
from src.data.readers import Document
from src.mamba.loss import IGNORE_INDEX
from src.mamba.tokenizer import MambaTokenizer


def pack_documents(documents: Sequence[Document], tokenizer: MambaTokenizer, source: str = "corpus") -> torch.Tensor:
    """The token stream ``<|bos|> doc1 <|eos|> <|bos|> doc2 <|eos|> ...`` as a 1-D LongTensor."""
    if not documents:
        raise DataError(f"{source}: no documents")
    stream: list[int] = []
    for doc, ids in zip(documents, tokenizer.encode_batch([d.text for d in documents])):
        if not ids:
            raise DataError(f"{source}: document '{doc.id}' has no text to tokenize")
        stream.append(tokenizer.bos_id)
        stream.extend(ids)
        stream.append(tokenizer.eos_id)
    return torch.tensor(stream, dtype=torch.long)


class TokenWindows(Dataset):
    """Consecutive, one-token-overlapping windows of ``max_length + 1`` tokens over a stream.

    Item ``i`` is a LongTensor of ``max_length + 1`` ids (the last window right-padded with
    ``pad_id``) and the number of real tokens in it.
    """

    def __init__(self, stream: torch.Tensor, max_length: int, pad_id: int) -> None:
        if max_length < 2:
            raise DataError(f"max_length must be at least 2, got {max_length}")
        if stream.numel() < 2:
            raise DataError("the token stream needs at least 2 tokens")
        self.stream = stream
        self.max_length = max_length
        self.pad_id = pad_id

    def __len__(self) -> int:
        return math.ceil((self.stream.numel() - 1) / self.max_length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.max_length
        window = self.stream[start : start + self.max_length + 1]
        length = window.numel()
        if length < self.max_length + 1:
            window = torch.cat([window, window.new_full((self.max_length + 1 - length,), self.pad_id)])
        return window, length

    def num_labels(self) -> int:
        """Tokens predicted over the whole dataset (= stream length - 1)."""
        return self.stream.numel() - 1


def collate_windows(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Stack windows into ``input_ids`` (B, T) and ``labels`` (B, T), padding labelled -100."""
    windows = torch.stack([w for w, _ in items])
    labels = windows[:, 1:].clone()
    for row, (_, length) in enumerate(items):
        labels[row, length - 1 :] = IGNORE_INDEX
    return {"input_ids": windows[:, :-1].contiguous(), "labels": labels}
