"""How far the classifier's encoder goes on the sample split, frozen: MiniLM's features into
logistic regression, against TF-IDF + logistic regression measured in the same run.

    python bench/classifier_probe.py [--data data] [--lengths 128 256] [--threads 1]
        [--output bench/results/classifier_probe.json]

For each window length and pooling (the CLS token; the mean over the word-pieces, the pooling
all-MiniLM-L6-v2 was trained with, L2-normalised), ``C`` of the logistic regression is chosen
on the **val** split by macro-F1, then the test split is scored once. TF-IDF is
:func:`src.classifier.evaluate.tfidf_logreg_baseline` (the classifier's own baseline, C chosen on
val too). Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.classifier.evaluate import tfidf_logreg_baseline  # noqa: E402
from src.core.hub import resolve_pretrained  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
C_GRID = (0.3, 1.0, 3.0, 10.0)


def load_split(data: Path, split: str, labels: list[str]) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in (data / f"classification_{split}.jsonl").read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows], np.array([labels.index(r["label"]) for r in rows])


def features(model, tokenizer, texts: list[str], length: int) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {"cls": [], "mean": []}
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            batch = tokenizer(texts[i : i + 64], truncation=True, max_length=length, padding=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
            out["cls"].append(hidden[:, 0].numpy())
            out["mean"].append(mean / np.linalg.norm(mean, axis=1, keepdims=True))
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "classifier_probe.json")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    labels = json.loads((args.data / "labels.json").read_text())
    splits = {s: load_split(args.data, s, labels) for s in ("train", "val", "test")}
    tfidf = tfidf_logreg_baseline(splits["train"][0], splits["train"][1], splits["test"][0], splits["test"][1], labels,
                                  splits["val"][0], splits["val"][1])
    rows = [{"model": "TF-IDF 1-2-grams + logistic regression", "C": tfidf["C"], "val_macro_f1": round(tfidf["val_macro_f1"], 4),
             "test_macro_f1": round(tfidf["macro_f1"], 4)}]
    source = resolve_pretrained("minilm-local", "bench")
    tokenizer, model = AutoTokenizer.from_pretrained(source), AutoModel.from_pretrained(source).eval()
    started = time.perf_counter()
    for length in args.lengths:
        feats = {s: features(model, tokenizer, splits[s][0], length) for s in splits}
        for pooling in ("cls", "mean"):
            best = None
            for c in C_GRID:
                clf = LogisticRegression(C=c, max_iter=3000).fit(feats["train"][pooling], splits["train"][1])
                val = f1_score(splits["val"][1], clf.predict(feats["val"][pooling]), average="macro")
                if best is None or val > best[0]:
                    best = (val, c, clf)
            val, c, clf = best
            test = f1_score(splits["test"][1], clf.predict(feats["test"][pooling]), average="macro")
            rows.append({"model": f"MiniLM frozen, {pooling} pooling, {length} word-pieces + logistic regression", "C": c,
                         "val_macro_f1": round(float(val), 4), "test_macro_f1": round(float(test), 4)})
    for row in rows:
        row["test_vs_tfidf"] = round(row["test_macro_f1"] - rows[0]["test_macro_f1"], 4)
    print(f"{'model':<72} {'C':>5} {'val F1':>7} {'test F1':>8} {'vs TF-IDF':>10}")
    for row in rows:
        print(f"{row['model']:<72} {row['C']:>5} {row['val_macro_f1']:>7.4f} {row['test_macro_f1']:>8.4f} {row['test_vs_tfidf']:>+10.4f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform()},
        "features_seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
