"""The Mamba training entry point (src/scripts/train_mamba.py) run in-process on a small
slice of the sample corpus, as the orchestrator and the full pipeline run it."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from src.core.checkpoint import load_checkpoint
from src.core.cli import run_cli
from src.mamba import generate, load_mamba
from src.mamba.tokenizer import MambaTokenizer
from src.scripts.train_mamba import main
from src.training import orchestrator

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(sample_data_dir, tmp_path_factory) -> Path:
    """12 training and 3 validation documents of the sample corpus, cut to a few KB each."""
    folder = tmp_path_factory.mktemp("mamba_corpus")
    for name, count, chars in (("lm_train.jsonl", 12, 4000), ("lm_val.jsonl", 3, 2500)):
        lines = (sample_data_dir / name).read_text().splitlines()[:count]
        docs = [json.loads(line) for line in lines]
        for doc in docs:
            doc["text"] = doc["text"][:chars]
        (folder / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
    return folder


def _argv(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "mamba_train.yaml"), "--device", "cpu",
        f"data.train_file={corpus / 'lm_train.jsonl'}", f"data.val_file={corpus / 'lm_val.jsonl'}",
        f"paths.checkpoint_dir={out / 'ckpt'}", f"paths.log_dir={out / 'logs'}",
        "model.vocab_size=400", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.state_size=8",
        "model.max_length=64", "model.chunk_size=16", "training.batch_size=8", "training.num_epochs=2",
        "training.learning_rate=0.003", "training.warmup_steps=2", "training.log_steps=5",
        "training.torch_threads=1", *extra,
    ]


def _snapshot(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One training run through the orchestrator: (output folder, summary)."""
    out = tmp_path_factory.mktemp("mamba_run")
    summary = orchestrator.main(["train", "--target=mamba", *_argv(corpus, out, "training.eval_steps=5")])
    return out, summary


def test_training_writes_every_output_and_beats_the_unigram_baseline(trained):
    out, summary = trained
    ckpt = out / "ckpt"
    for name in ("checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "best_model.pt", "vocab.json", "config.yaml"):
        assert (ckpt / name).is_file(), name
    assert (out / "logs" / "train.log").is_file()
    evals = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert len(evals) >= 3 and all("val_perplexity" in e for e in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # training lowers the validation loss

    metrics = summary["metrics"]
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-6)
    assert metrics["best_val_loss"] == pytest.approx(min(e["val_loss"] for e in evals), abs=1e-5)
    assert metrics["val_perplexity"] < metrics["unigram_val_perplexity"]
    # the count-based 3-gram is reported beside it, and is the stronger of the two baselines
    assert metrics["kn3_val_perplexity"] == pytest.approx(math.exp(metrics["kn3_val_loss"]), rel=1e-9)
    assert metrics["kn3_val_perplexity"] < metrics["unigram_val_perplexity"]
    assert all("kn3_val_perplexity" in e for e in evals)
    assert metrics["val_loss"] < math.log(metrics["vocab_size"]) - 1.0
    assert summary["outputs"]["best_model"] == str(ckpt / "best_model.pt")
    assert Path(summary["outputs"]["train_log"]).is_file()


def test_best_model_loads_alone_and_generates(trained):
    out, _ = trained
    model, tokenizer = load_mamba(out / "ckpt" / "best_model.pt")
    assert not model.training
    vocab = MambaTokenizer.from_file(out / "ckpt" / "vocab.json")
    assert vocab.fingerprint() == tokenizer.fingerprint()
    best = load_checkpoint(out / "ckpt" / "best_model.pt", kind="mamba")
    assert best["extra"]["tokenizer_sha256"] == tokenizer.fingerprint()
    text = generate(model, tokenizer, "Return the", max_new_tokens=12, temperature=0.7, seed=0)
    assert text == generate(model, tokenizer, "Return the", max_new_tokens=12, temperature=0.7, seed=0)
    assert isinstance(text, str) and text


def test_resume_with_the_vocab_of_another_model_is_refused_and_changes_nothing(trained, corpus, tmp_path, capsys):
    out, _ = trained
    other = MambaTokenizer.train(["completely different words for another model"] * 30, vocab_size=300)
    vocab = out / "ckpt" / "vocab.json"
    original = vocab.read_bytes()
    other.save(vocab)
    try:
        before = _snapshot(out)
        code = run_cli(main, _argv(corpus, out, "--resume"))
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("error:") and "vocab.json" in err and "another model" in err and "\n" not in err
        assert _snapshot(out) == before
    finally:
        vocab.write_bytes(original)


def test_resume_continues_exactly_where_the_run_stopped(corpus, tmp_path):
    constant = ("training.lr_scheduler=constant", "training.warmup_steps=0")
    main(_argv(corpus, tmp_path / "straight", *constant))
    main(_argv(corpus, tmp_path / "split", *constant, "training.num_epochs=1"))
    assert not (tmp_path / "split" / "ckpt" / "checkpoint_epoch_2.pt").exists()
    summary = main(_argv(corpus, tmp_path / "split", *constant, "--resume"))
    assert "resumed from" in (tmp_path / "split" / "logs" / "train.log").read_text()
    assert summary["metrics"]["epochs_completed"] == 2
    a = load_checkpoint(tmp_path / "straight" / "ckpt" / "checkpoint_epoch_2.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "ckpt" / "checkpoint_epoch_2.pt")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty_corpus", "no records"),
        ("empty_document", "text is empty"),
        ("max_length_1", "model.max_length"),
        ("vocab_too_small", "model.vocab_size"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, expected, corpus, tmp_path, capsys):
    train = corpus / "lm_train.jsonl"
    extra = []
    if case == "empty_corpus":
        train = tmp_path / "empty.jsonl"
        train.write_text("")
    elif case == "empty_document":
        train = tmp_path / "blank.jsonl"
        train.write_text(json.dumps({"id": "d1", "text": "fine text"}) + "\n" + json.dumps({"id": "d2", "text": "  "}) + "\n")
    elif case == "max_length_1":
        extra = ["model.max_length=1"]
    else:
        extra = ["model.vocab_size=100"]
    code = run_cli(main, _argv(corpus, tmp_path / "out", f"data.train_file={train}", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and expected in err and "\n" not in err
    assert not (tmp_path / "out").exists()
