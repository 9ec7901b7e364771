"""Classifier evaluation: accuracy, macro-F1, per-class scores, confusion matrix, baseline, the test report."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from src.classifier.config import TransferConfig
from src.classifier.load import load_classifier


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str]) -> dict:
    """Scores of ``predictions`` against ``labels`` (label indices).

    Returns ``{"accuracy", "macro_f1", "num_examples", "per_class": {name: {"precision",
    "recall", "f1", "support"}}, "confusion_matrix": [[...]]}`` where row i of the matrix
    counts the examples of label i by predicted label. A class never predicted has
    precision 0.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = list(range(len(label_names)))
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, average=None, zero_division=0
    )
    present = support > 0  # macro-F1 over the classes the split has
    return {
        "accuracy": float((labels == predictions).mean()) if len(labels) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "num_examples": int(len(labels)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
    }


def majority_baseline(train_labels: Sequence[int], labels: Sequence[int], label_names: Sequence[str]) -> dict:
    """Scores of always predicting the most frequent training label on ``labels``."""
    majority = Counter(train_labels).most_common(1)[0][0]
    scores = classification_metrics(labels, [majority] * len(labels), label_names)
    return {"label": label_names[majority], "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


TFIDF_C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


def tfidf_logreg_baseline(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    test_texts: Sequence[str],
    test_labels: Sequence[int],
    label_names: Sequence[str],
    val_texts: Sequence[str] | None = None,
    val_labels: Sequence[int] | None = None,
) -> dict:
    """The cheap strong baseline: TF-IDF of word 1-2-grams + logistic regression (scikit-learn).

    Trained on the same training split as the fine-tuned model; its inverse regularisation
    ``C`` is picked on the validation split by macro-F1 (``TFIDF_C_GRID``; 1.0 without a
    validation split), as the fine-tuned model's best epoch is; then scored on the test split.
    Deterministic (lbfgs, no random state involved). Returns ``{"accuracy", "macro_f1", "C",
    "val_macro_f1", "per_class", "fit_seconds"}``.
    """
    import time

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vectorizer.fit_transform(train_texts)

    def fit(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=2000).fit(x_train, train_labels)

    best_c, val_f1 = 1.0, None
    if val_texts is not None and val_labels is not None and len(val_texts):
        x_val = vectorizer.transform(val_texts)
        for c in TFIDF_C_GRID:
            f1 = classification_metrics(val_labels, fit(c).predict(x_val).tolist(), label_names)["macro_f1"]
            if val_f1 is None or f1 > val_f1:  # first best: the smallest C among ties (most regularised)
                best_c, val_f1 = c, f1
    predictions = fit(best_c).predict(vectorizer.transform(test_texts)).tolist()
    scores = classification_metrics(test_labels, predictions, label_names)
    return {
        "model": "tfidf(1-2-grams, sublinear tf) + logistic regression",
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "C": best_c,
        "val_macro_f1": val_f1,
        "per_class": scores["per_class"],
        "fit_seconds": round(time.perf_counter() - started, 2),
    }


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], label_names: Sequence[str], path: str | Path, title: str) -> Path:
    """Save the confusion matrix (rows: true label, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.6 * len(label_names) + 2.5, 1.4 * len(label_names) + 2))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(label_names)), label_names, rotation=30, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="white" if matrix[i, j] > threshold else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_on_test(
    best_path: Path, train_labels: list[int], test, label_names: list[str], cfg: TransferConfig, train=None, val=None
) -> dict:
    """Score ``best_path``, loaded on its own as the API would load it, on the test split,
    next to the majority-class baseline and, given the ``train`` split (and ``val`` to tune
    it), the TF-IDF + logistic-regression baseline (:func:`tfidf_logreg_baseline`) with the
    fine-tuned model's margin over it."""
    classifier = load_classifier(best_path, cfg.system.device)
    eval_batch = cfg.training.eval_batch_size or cfg.training.batch_size
    predictions = classifier.predict_proba(test.texts, batch_size=eval_batch).argmax(-1).tolist()
    scores = classification_metrics(test.labels, predictions, label_names)
    report = {
        "test_file": str(test.path),
        "checkpoint": str(best_path),
        "label_names": label_names,
        **scores,
        "majority_baseline": majority_baseline(train_labels, test.labels, label_names),
    }
    if train is not None:
        report["tfidf_baseline"] = tfidf_logreg_baseline(
            train.texts, train.labels, test.texts, test.labels, label_names,
            val.texts if val is not None else None, val.labels if val is not None else None,
        )
        report["margin_over_tfidf"] = {
            "accuracy": scores["accuracy"] - report["tfidf_baseline"]["accuracy"],
            "macro_f1": scores["macro_f1"] - report["tfidf_baseline"]["macro_f1"],
        }
    return report


def format_report(report: dict) -> str:
    """The test report as a small text table."""
    width = max(len(name) for name in report["label_names"]) + 2
    lines = [f"{'label':<{width}} precision  recall      f1  support"]
    for name, s in report["per_class"].items():
        lines.append(f"{name:<{width}} {s['precision']:9.3f} {s['recall']:7.3f} {s['f1']:7.3f} {s['support']:8d}")
    base = report["majority_baseline"]
    lines.append(f"fine-tuned model: accuracy {report['accuracy']:.3f} | macro-F1 {report['macro_f1']:.3f}")
    tfidf = report.get("tfidf_baseline")
    if tfidf:
        lines.append(
            f"TF-IDF + logistic regression (C={tfidf['C']:g}): accuracy {tfidf['accuracy']:.3f} | macro-F1 {tfidf['macro_f1']:.3f}"
            f" | fine-tuned margin {report['macro_f1'] - tfidf['macro_f1']:+.3f} macro-F1"
        )
    lines.append(f"majority baseline ('{base['label']}'): accuracy {base['accuracy']:.3f} | macro-F1 {base['macro_f1']:.3f}")
    return "\n".join(lines)
