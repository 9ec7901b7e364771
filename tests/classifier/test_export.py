"""The classifier's HF export (src/classifier/export.py) and the refusal of crafted
checkpoints by src/classifier/model.py's tokenizer_from_files."""

import json

import pytest
import torch

from src.core.checkpoint import save_checkpoint
from src.core.cli import run_cli
from src.core.errors import CheckpointError
from src.core.runtime import seed_everything
from src.classifier.config import ClassifierModelConfig
from src.classifier.export import export_hf
from src.classifier.load import DocumentClassifier, classifier_extra_state, load_classifier
from src.classifier.model import build_model_and_tokenizer

LABELS = ["text_and_data", "networking_and_web", "system_and_concurrency"]
TEXTS = [
    "Open a TCP connection to the given host and port and return the socket.",
    "Split the string at commas and strip every field.",
    "Start a worker thread and wait until it has finished, then return its exit code. " * 6,
    "Parse the JSON body of the HTTP request.",
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    seed_everything(0)
    model, tokenizer = build_model_and_tokenizer(ClassifierModelConfig(base_model="minilm-local", max_length=32), LABELS)
    with torch.no_grad():  # a head that separates the texts (a fresh one predicts near-uniform)
        model.classifier.weight.normal_(0, 2.0)
    return model, tokenizer


def test_hf_export_predicts_what_marks_predict_does(model_and_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tokenizer = model_and_tokenizer
    mark = DocumentClassifier(model, tokenizer, LABELS, max_length=32)
    out = export_hf(mark, tmp_path / "hf")
    assert json.loads((out / "mark_classifier.json").read_text())["long_text"] == "truncate"

    hf_model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_model.config.id2label == dict(enumerate(LABELS))
    assert hf_model.config.label2id == {name: i for i, name in enumerate(LABELS)}
    batch = hf_tok(TEXTS, truncation=True, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 32  # the long text is cut where MARK cuts it
    with torch.no_grad():
        probabilities = torch.softmax(hf_model(**batch).logits, -1)
    expected = mark.predict(TEXTS)
    assert [hf_model.config.id2label[i] for i in probabilities.argmax(-1).tolist()] == [p["label"] for p in expected]
    assert len({p["label"] for p in expected}) >= 2  # the check can tell labels apart
    assert torch.allclose(probabilities, mark.predict_proba(TEXTS), atol=1e-5)


def _checkpoint_with_tokenizer_files(model_and_tokenizer, path, rename):
    model, tokenizer = model_and_tokenizer
    extra = classifier_extra_state(model, tokenizer, LABELS, ClassifierModelConfig(base_model="minilm-local", max_length=32))
    extra["tokenizer_files"] = {rename.get(name, name): content for name, content in extra["tokenizer_files"].items()}
    return save_checkpoint({"kind": "transfer", "model": model.state_dict(), "extra": extra}, path)


@pytest.mark.parametrize("crafted", ["../../x", "/tmp/mark_crafted_x", "sub/tokenizer.json", "evil.sh"])
def test_crafted_tokenizer_file_names_are_refused_and_nothing_is_written(crafted, model_and_tokenizer, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp" / "a" / "b"))
    (tmp_path / "tmp" / "a" / "b").mkdir(parents=True)
    path = _checkpoint_with_tokenizer_files(model_and_tokenizer, tmp_path / "best_model.pt", {"tokenizer_config.json": crafted})
    with pytest.raises(CheckpointError) as err:
        load_classifier(path, device="cpu")
    message = str(err.value)
    assert "refused" in message and repr(crafted) in message and "\n" not in message
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["best_model.pt"]  # no x beside or above the temporary folder
    assert not (tmp_path / "x").exists() and not (tmp_path / "tmp" / "x").exists()


def test_crafted_checkpoint_is_a_one_line_exit_2_through_the_cli(model_and_tokenizer, tmp_path, capsys):
    path = _checkpoint_with_tokenizer_files(model_and_tokenizer, tmp_path / "best_model.pt", {"tokenizer.json": "../../x"})
    code = run_cli(lambda argv: load_classifier(argv[0], device="cpu"), [str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "refused" in err and "\n" not in err


def test_a_genuine_checkpoint_still_loads(model_and_tokenizer, tmp_path):
    path = _checkpoint_with_tokenizer_files(model_and_tokenizer, tmp_path / "best_model.pt", {})
    loaded = load_classifier(path, device="cpu")
    assert loaded.predict(TEXTS[:1])[0]["label"] in LABELS
