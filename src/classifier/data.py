"""Classification data: label names, labelled JSONL splits, and word-piece windows.

A document becomes one window (``truncate``) or several overlapping windows
(``sliding_window``) of at most ``max_length`` word-pieces, special tokens included.
:func:`collate_windows` flattens the windows of a batch of documents and records which
document each window belongs to, so the model's window logits can be pooled per document
(:func:`src.classifier.model.pool_window_logits`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from src.core.errors import ConfigError, DataError
from src.core.logging import get_logger
from src.data.readers import read_classification

LABELS_FILE = "labels.json"


@dataclass
class LabelledTexts:
    """The texts of one split and their label indices."""

    path: Path
    texts: list[str]
    labels: list[int]


def _non_blank_line_numbers(path: Path) -> list[int]:
    # read_classification skips blank lines; record i is the i-th non-blank line.
    with open(path, encoding="utf-8") as handle:
        return [lineno for lineno, line in enumerate(handle, start=1) if line.strip()]


def read_label_names_file(path: Path) -> list[str]:
    """Label names from a ``labels.json`` list; anything else is a ``DataError``."""
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: expected a non-empty JSON list of label names")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate label names")
    return names


def resolve_label_names(
    train_file: Path, config_names: list[str] | None, num_labels: int
) -> tuple[list[str], str]:
    """The label names in index order, and where they came from.

    In order of preference: ``data.label_names`` in the config, ``labels.json`` beside the
    training file, the sorted label names found in the training file (or ``label_0`` ...
    when it has only integer labels). Their number must equal ``model.num_labels``:
    a mismatch is a ``ConfigError`` naming both.
    """
    labels_file = Path(train_file).parent / LABELS_FILE
    if config_names is not None:
        names, source = list(config_names), "data.label_names"
    elif labels_file.is_file():
        names, source = read_label_names_file(labels_file), str(labels_file)
    else:
        found = {ex.label for ex in read_classification(train_file)}
        string_labels = sorted(label for label in found if isinstance(label, str))
        if string_labels:
            names, source = string_labels, f"the labels found in {train_file}"
        else:
            names, source = [f"label_{i}" for i in range(num_labels)], "model.num_labels (the data has integer labels only)"
    if len(names) != num_labels:
        raise ConfigError(
            f"model.num_labels is {num_labels} but {source} gives {len(names)} labels {names}; "
            f"set model.num_labels: {len(names)} or fix the label names"
        )
    return names, source


def read_labelled_texts(path: Path, label_names: Sequence[str], limit: int | None = None) -> LabelledTexts:
    """Texts and label indices of a ``{text, label}`` JSONL file.

    A label is a name from ``label_names`` or an index into it; any other label is a
    ``DataError`` naming the file and line. ``limit`` keeps the first N examples.
    """
    path = Path(path)
    examples = read_classification(path)
    line_numbers = _non_blank_line_numbers(path)
    index_of = {name: i for i, name in enumerate(label_names)}
    texts, labels = [], []
    for example, lineno in zip(examples, line_numbers):
        label = example.label
        if isinstance(label, str) and label in index_of:
            index = index_of[label]
        elif isinstance(label, int) and 0 <= label < len(label_names):
            index = label
        else:
            raise DataError(f"{path}:{lineno}: label {label!r} is not one of {list(label_names)}")
        texts.append(example.text)
        labels.append(index)
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
    return LabelledTexts(path, texts, labels)


def window_token_ids(
    tokenizer, texts: Sequence[str], max_length: int, long_text: str, window_stride: int, max_windows: int
) -> list[list[list[int]]]:
    """For each text, its windows of word-piece ids (special tokens included).

    ``truncate``: one window, the first ``max_length`` word-pieces. ``sliding_window``:
    windows starting every ``window_stride`` word-pieces until the text is covered, at most
    ``max_windows`` of them.
    """
    texts = list(texts)
    if not texts:
        return []
    if long_text == "truncate":
        encoded = tokenizer(texts, truncation=True, max_length=max_length, verbose=False)["input_ids"]
        return [[ids] for ids in encoded]
    content = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if not 0 < window_stride <= content:
        raise ConfigError(
            f"model.window_stride: {window_stride} must be between 1 and {content} "
            f"(max_length minus special tokens), or windows would skip text"
        )
    # The tokenizer's own overflow windows; its "stride" is the overlap between windows.
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        stride=content - window_stride,
        return_overflowing_tokens=True,
        verbose=False,
    )
    windows: list[list[list[int]]] = [[] for _ in texts]
    for ids, doc in zip(encoded["input_ids"], encoded["overflow_to_sample_mapping"]):
        if len(windows[doc]) < max_windows:
            windows[doc].append(ids)
    return windows


class WindowedDataset(torch.utils.data.Dataset):
    """Items ``{"windows": [[ids]...], "label": int}`` (label omitted when unlabelled)."""

    def __init__(self, windows: list[list[list[int]]], labels: list[int] | None = None) -> None:
        if labels is not None and len(labels) != len(windows):
            raise ValueError("one label per document")
        self.windows = windows
        self.labels = labels

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        item = {"windows": self.windows[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item

    def num_windows(self) -> int:
        return sum(len(w) for w in self.windows)


def build_dataset(tokenizer, split: LabelledTexts, model_cfg) -> WindowedDataset:
    """Tokenize a split into windows as ``model_cfg`` (the ``model`` section) says."""
    windows = window_token_ids(
        tokenizer, split.texts, model_cfg.max_length, model_cfg.long_text, model_cfg.window_stride, model_cfg.max_windows
    )
    dataset = WindowedDataset(windows, split.labels)
    get_logger("transfer").info(
        "%s: %d documents, %d windows of <= %d word-pieces (%s)",
        split.path, len(dataset), dataset.num_windows(), model_cfg.max_length, model_cfg.long_text,
    )
    return dataset


def collate_windows(items: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad the windows of a batch of documents to the longest one.

    Returns ``input_ids`` and ``attention_mask`` ``(num_windows, length)``, ``doc_index``
    ``(num_windows,)`` (the document of each window) and, for labelled items, ``labels``
    ``(num_docs,)``.
    """
    flat = [(doc, ids) for doc, item in enumerate(items) for ids in item["windows"]]
    length = max(len(ids) for _, ids in flat)
    input_ids = torch.full((len(flat), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(flat), length), dtype=torch.long)
    for row, (_, ids) in enumerate(flat):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "doc_index": torch.tensor([doc for doc, _ in flat], dtype=torch.long),
    }
    if "label" in items[0]:
        batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
    return batch
