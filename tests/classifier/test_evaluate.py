"""Accuracy, macro-F1, per-class scores, confusion matrix and the majority baseline."""

import pytest

from src.classifier.evaluate import classification_metrics, majority_baseline, plot_confusion_matrix, tfidf_logreg_baseline

NAMES = ["a", "b", "c"]


def test_scores_match_a_hand_computed_example():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    scores = classification_metrics(labels, preds, NAMES)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # a: p 1, r 2/3, f1 0.8 | b: p 1/2, r 1/2, f1 0.5 | c: p 1/2, r 1, f1 2/3
    assert scores["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert scores["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert scores["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert scores["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_majority_baseline_predicts_the_most_frequent_training_label():
    base = majority_baseline([1, 1, 0, 2, 1], [0, 1, 1, 2], NAMES)
    assert base["label"] == "b"
    assert base["accuracy"] == pytest.approx(0.5)
    assert base["macro_f1"] == pytest.approx((0 + 2 / 3 + 0) / 3)


def test_confusion_matrix_png(tmp_path):
    path = plot_confusion_matrix([[3, 1, 0], [0, 2, 0], [1, 0, 4]], NAMES, tmp_path / "cm.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tfidf_baseline_learns_words_picks_c_on_val_and_is_deterministic():
    words = {0: "socket http url request server", 1: "thread lock process queue signal", 2: "json csv string text parse"}
    def docs(n, offset):
        texts, labels = [], []
        for i in range(n):
            label = (i + offset) % 3
            vocab = words[label].split()
            texts.append(" ".join(vocab[(i + j) % len(vocab)] for j in range(3)) + f" filler{i % 4}")
            labels.append(label)
        return texts, labels
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = docs(30, 0), docs(12, 1), docs(12, 2)
    first = tfidf_logreg_baseline(train_x, train_y, test_x, test_y, NAMES, val_x, val_y)
    again = tfidf_logreg_baseline(train_x, train_y, test_x, test_y, NAMES, val_x, val_y)
    assert first["macro_f1"] == 1.0 and first["accuracy"] == 1.0
    assert first["val_macro_f1"] == 1.0 and first["C"] == 0.3  # ties: the most regularised C
    assert {k: v for k, v in first.items() if k != "fit_seconds"} == {k: v for k, v in again.items() if k != "fit_seconds"}
    no_val = tfidf_logreg_baseline(train_x, train_y, test_x, test_y, NAMES)
    assert no_val["C"] == 1.0 and no_val["val_macro_f1"] is None
