"""Take a trained MARK classifier elsewhere: a Hugging Face folder.

    from src.classifier.load import load_classifier
    from src.classifier.export import export_hf
    export_hf(load_classifier("checkpoints/transformer"), "exports/classifier-hf")

The folder loads with ``AutoModelForSequenceClassification.from_pretrained`` and
``AutoTokenizer.from_pretrained``: ``config.json`` names the labels (``id2label`` /
``label2id``), ``model.safetensors`` holds the fine-tuned weights, and the tokenizer's
``model_max_length`` is MARK's ``max_length``, so ``tokenizer(texts, truncation=True)`` cuts
texts where MARK does and the prediction is MARK's ``predict`` (``long_text: truncate``).
``mark_classifier.json`` records how MARK windows long documents (a ``sliding_window`` model
averages the logits of its windows; transformers alone reads the first window).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from src.classifier.load import DocumentClassifier
from src.core.errors import CheckpointError

WINDOWING_FILE = "mark_classifier.json"


def export_hf(classifier: DocumentClassifier, out_dir: str | Path) -> Path:
    """Write ``classifier`` as a Hugging Face sequence-classification folder; returns ``out_dir``.

    Written to a temporary sibling folder and renamed at the end (an older export is replaced)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model, labels = classifier.model, classifier.label_names
    if int(model.config.num_labels) != len(labels):
        raise CheckpointError(f"the model has {model.config.num_labels} outputs but {len(labels)} label names")
    config = model.config
    saved = (config.id2label, config.label2id)
    try:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        model.save_pretrained(staging, safe_serialization=True)
        classifier.tokenizer.save_pretrained(staging)
        tok_config_path = staging / "tokenizer_config.json"
        tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
        tok_config["model_max_length"] = classifier.max_length  # truncate where MARK does
        tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        (staging / WINDOWING_FILE).write_text(json.dumps({
            "label_names": labels,
            "max_length": classifier.max_length,
            "long_text": classifier.long_text,
            "window_stride": classifier.window_stride,
            "max_windows": classifier.max_windows,
            "pooling": "mean of window logits" if classifier.long_text == "sliding_window" else "first window",
        }, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        config.id2label, config.label2id = saved
    if out_dir.is_dir():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)
    return out_dir
