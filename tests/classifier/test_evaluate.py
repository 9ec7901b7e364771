"""Accuracy, macro-F1, per-class scores, confusion matrix and the majority baseline."""

import pytest

from src.classifier.evaluate import classification_metrics, majority_baseline, plot_confusion_matrix

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
