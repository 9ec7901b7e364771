"""Label names, labelled splits, word-piece windows and batching of src/classifier/data.py."""

import json
import shutil

import pytest
import torch

from src.core.errors import ConfigError, DataError
from src.core.hub import resolve_pretrained
from src.classifier.data import (
    WindowedDataset,
    collate_windows,
    read_labelled_texts,
    resolve_label_names,
    window_token_ids,
)
from src.training.engine import ResumableBatchSampler

LABELS = ["text_and_data", "networking_and_web", "system_and_concurrency"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_pretrained("minilm-local"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_names_come_from_labels_json_then_config_then_data(sample_data_dir, tmp_path):
    train = sample_data_dir / "classification_train.jsonl"
    names, source = resolve_label_names(train, None, 3)
    assert names == LABELS and source.endswith("labels.json")

    names, source = resolve_label_names(train, ["a", "b", "c"], 3)
    assert names == ["a", "b", "c"] and source == "data.label_names"

    alone = shutil.copy(train, tmp_path / "train.jsonl")  # no labels.json beside it
    names, source = resolve_label_names(alone, None, 3)
    assert names == sorted(LABELS) and "found in" in source


def test_num_labels_mismatch_is_a_clear_config_error(sample_data_dir):
    with pytest.raises(ConfigError) as err:
        resolve_label_names(sample_data_dir / "classification_train.jsonl", None, 4)
    message = str(err.value)
    assert "model.num_labels is 4" in message and "3 labels" in message and "\n" not in message


def test_unknown_label_is_a_data_error_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"text": "Open a socket.", "label": "networking_and_web"}) + "\n\n"
        + json.dumps({"text": "Parse a CSV row.", "label": "cooking"}) + "\n"
    )
    with pytest.raises(DataError, match=r"train\.jsonl:3: label 'cooking' is not one of"):
        read_labelled_texts(path, LABELS)


def test_labels_by_name_or_index(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c", "label": 2}, {"text": "d e f", "label": "text_and_data"}])
    split = read_labelled_texts(path, LABELS)
    assert split.labels == [2, 0] and split.texts == ["a b c", "d e f"]
    with pytest.raises(DataError, match=r"t\.jsonl:1: label 5"):
        read_labelled_texts(_write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": 5}]), LABELS)


def test_truncation_keeps_the_first_max_length_word_pieces(tokenizer):
    text = " ".join(f"word{i}" for i in range(200))
    (windows,) = window_token_ids(tokenizer, [text], 32, "truncate", 16, 8)
    assert len(windows) == 1 and len(windows[0]) == 32
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert windows[0][1:-1] == full[:30]
    assert windows[0][0] == tokenizer.cls_token_id and windows[0][-1] == tokenizer.sep_token_id


def test_sliding_windows_cover_the_text_every_stride(tokenizer):
    text = " ".join(f"token{i}" for i in range(150))
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    max_length, stride = 32, 20
    content = max_length - 2
    (windows,) = window_token_ids(tokenizer, [text], max_length, "sliding_window", stride, 100)
    expected_starts = list(range(0, len(full) - content + stride, stride))
    assert len(windows) == len(expected_starts) > 3
    for window, start in zip(windows, expected_starts):
        assert window[1:-1] == full[start : start + content]
        assert len(window) <= max_length
    assert windows[-1][-2] == full[-1]  # the last window reaches the end of the text
    # A short text is one window; max_windows caps a long one.
    assert len(window_token_ids(tokenizer, ["short text"], max_length, "sliding_window", stride, 100)[0]) == 1
    assert len(window_token_ids(tokenizer, [text], max_length, "sliding_window", stride, 3)[0]) == 3


def test_a_stride_that_would_skip_text_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="model.window_stride"):
        window_token_ids(tokenizer, ["some text"], 32, "sliding_window", 31, 4)


def test_collate_pads_windows_and_records_their_document():
    items = [{"windows": [[101, 5, 102], [101, 6, 7, 8, 102]], "label": 2}, {"windows": [[101, 9, 102]], "label": 0}]
    batch = collate_windows(items, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[101, 5, 102, 0, 0], [101, 6, 7, 8, 102], [101, 9, 102, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 5, 3]
    assert batch["doc_index"].tolist() == [0, 0, 1]
    assert batch["labels"].tolist() == [2, 0]
    assert "labels" not in collate_windows([{"windows": [[1, 2]]}], 0)


def test_length_grouped_batches_cut_padding_on_the_sample_set(sample_data_dir, tokenizer):
    split = read_labelled_texts(sample_data_dir / "classification_train.jsonl", LABELS)
    windows = window_token_ids(tokenizer, split.texts, 128, "truncate", 64, 1)
    lengths = [len(w[0]) for w in windows]
    dataset = WindowedDataset(windows, split.labels)

    def padded_tokens(sampler):
        return sum(collate_windows([dataset[i] for i in batch], 0)["input_ids"].numel() for batch in sampler)

    random_batches = ResumableBatchSampler(len(dataset), 16, seed=1, epoch=0)
    grouped = ResumableBatchSampler(len(dataset), 16, seed=1, epoch=0, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(len(dataset)))  # every example once
    assert padded_tokens(grouped) < 0.7 * padded_tokens(random_batches)
    assert sum(lengths) <= padded_tokens(grouped) < 1.1 * sum(lengths)
    assert torch.tensor([len(b) for b in grouped][:-1]).eq(16).all()
