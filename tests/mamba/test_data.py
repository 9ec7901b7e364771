"""Packing documents into training windows (src/mamba/data.py)."""

import math

import pytest
import torch

from src.core.errors import DataError
from src.data.readers import Document
from src.mamba.data import IGNORE_INDEX, TokenWindows, collate_windows, pack_documents
from src.mamba.evaluate import unigram_cross_entropy
from src.mamba.tokenizer import MambaTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return MambaTokenizer.train(["the quick brown fox jumps over the lazy dog " * 5] * 10, vocab_size=300)


def test_documents_are_packed_with_bos_and_eos(tokenizer):
    docs = [Document(id="a", text="the fox"), Document(id="b", text="lazy dog")]
    stream = pack_documents(docs, tokenizer).tolist()
    a, b = tokenizer.encode("the fox"), tokenizer.encode("lazy dog")
    assert stream == [1, *a, 2, 1, *b, 2]


@pytest.mark.parametrize("max_length", [2, 3, 7, 16, 1000])
def test_windows_keep_every_token_exactly_once(max_length):
    stream = torch.arange(100, 141)  # 41 tokens, a "document" far longer than most windows
    windows = TokenWindows(stream, max_length, pad_id=0)
    assert len(windows) == math.ceil(40 / max_length)
    batch = collate_windows([windows[i] for i in range(len(windows))])
    assert batch["input_ids"].shape == batch["labels"].shape == (len(windows), max_length)
    labels = batch["labels"][batch["labels"] != IGNORE_INDEX]
    assert labels.tolist() == stream[1:].tolist()  # every token after the first is predicted once, in order
    inputs = batch["input_ids"].flatten()[: stream.numel() - 1]
    assert inputs.tolist() == stream[:-1].tolist()
    for row in range(len(windows)):  # each label is the next token of its input
        real = batch["labels"][row] != IGNORE_INDEX
        assert torch.equal(batch["input_ids"][row][1:][real[:-1]], batch["labels"][row][:-1][real[:-1]])


def test_empty_corpus_and_empty_documents_are_data_errors(tokenizer):
    with pytest.raises(DataError, match="no documents"):
        pack_documents([], tokenizer, "train.jsonl")
    with pytest.raises(DataError, match="max_length must be at least 2"):
        TokenWindows(torch.arange(10), 1, 0)


def test_unigram_baseline_is_the_cross_entropy_of_smoothed_frequencies():
    train = torch.tensor([4, 4, 4, 5])
    val = torch.tensor([4, 5])
    # add-one over 8 symbols: p(4) = 4/12, p(5) = 2/12
    expected = -(math.log(4 / 12) + math.log(2 / 12)) / 2
    assert abs(unigram_cross_entropy(train, val, vocab_size=8) - expected) < 1e-9
