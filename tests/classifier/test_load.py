"""The model and predictor of src/classifier: loading, window pooling, predict, checkpoint round trip.

These use MiniLM with a freshly initialised head: they test the plumbing, not accuracy
(tests/scripts/test_train_transfer.py trains for real).
"""

import pytest
import torch

from src.core.checkpoint import save_checkpoint
from src.core.errors import CheckpointError, ConfigError
from src.core.runtime import seed_everything
from src.classifier.config import ClassifierModelConfig
from src.classifier.model import build_model_and_tokenizer, pool_window_logits
from src.classifier.load import DocumentClassifier, classifier_extra_state, load_classifier

LABELS = ["text_and_data", "networking_and_web", "system_and_concurrency"]
TEXTS = [
    "Open a TCP connection to the given host and port and return the socket.",
    "Split the string at commas.",
    "Start a worker thread and wait until it has finished, then return its exit code. " * 6,
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    seed_everything(0)
    return build_model_and_tokenizer(ClassifierModelConfig(base_model="minilm-local", max_length=32), LABELS)


def _classifier(model_and_tokenizer, **kw):
    model, tokenizer = model_and_tokenizer
    return DocumentClassifier(model, tokenizer, LABELS, max_length=32, **kw)


def test_predict_returns_label_names_and_probabilities_summing_to_one(model_and_tokenizer):
    results = _classifier(model_and_tokenizer).predict(TEXTS)
    assert len(results) == len(TEXTS)
    for result in results:
        probs = result["probabilities"]
        assert list(probs) == LABELS
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert result["label"] == max(probs, key=probs.get)
    assert _classifier(model_and_tokenizer).predict([]) == []


def test_batching_and_order_do_not_change_predictions(model_and_tokenizer):
    classifier = _classifier(model_and_tokenizer)
    one_by_one = classifier.predict_proba(TEXTS, batch_size=1)
    all_at_once = classifier.predict_proba(TEXTS, batch_size=32)
    reversed_order = classifier.predict_proba(TEXTS[::-1], batch_size=2).flip(0)
    assert torch.allclose(one_by_one, all_at_once, atol=1e-5)
    assert torch.allclose(reversed_order, all_at_once, atol=1e-5)


def test_pooling_is_the_mean_of_each_documents_window_logits():
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, -6.0], [0.0, 1.0]])
    pooled = pool_window_logits(logits, torch.tensor([0, 0, 1, 2]), 3)
    assert pooled.tolist() == [[2.0, 3.0], [5.0, -6.0], [0.0, 1.0]]


def test_sliding_window_prediction_is_the_softmax_of_mean_window_logits(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    classifier = _classifier(model_and_tokenizer, long_text="sliding_window", window_stride=12, max_windows=16)
    long_text = TEXTS[2]
    encoded = tokenizer(long_text, truncation=True, max_length=32, stride=32 - 2 - 12, return_overflowing_tokens=True)
    windows = encoded["input_ids"]
    assert len(windows) > 2
    with torch.no_grad():
        window_logits = torch.cat([model(input_ids=torch.tensor([w])).logits for w in windows])
    expected = torch.softmax(window_logits.mean(0), -1)
    got = classifier.predict_proba([long_text, TEXTS[0]])[0]
    assert torch.allclose(got, expected, atol=1e-5)
    truncated = _classifier(model_and_tokenizer).predict_proba([long_text])[0]
    assert not torch.allclose(got, truncated, atol=1e-4)  # the later windows count


def test_checkpoint_round_trip_predicts_the_same(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    cfg = ClassifierModelConfig(base_model="minilm-local", max_length=32, long_text="sliding_window", window_stride=12)
    path = save_checkpoint(
        {"kind": "transfer", "model": model.state_dict(), "extra": classifier_extra_state(model, tokenizer, LABELS, cfg)},
        tmp_path / "best_model.pt",
    )
    loaded = load_classifier(tmp_path, device="cpu")  # a folder means its best_model.pt
    assert loaded.label_names == LABELS and loaded.long_text == "sliding_window" and loaded.window_stride == 12
    original = _classifier(model_and_tokenizer, long_text="sliding_window", window_stride=12)
    assert torch.allclose(loaded.predict_proba(TEXTS), original.predict_proba(TEXTS), atol=1e-5)
    assert path.is_file()


def test_foreign_or_missing_checkpoints_are_one_line_errors(tmp_path):
    save_checkpoint({"kind": "mamba", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is for 'mamba', expected 'transfer'"):
        load_classifier(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_classifier(tmp_path / "nothing")


def test_unreachable_hub_id_is_a_one_line_error():
    cfg = ClassifierModelConfig(base_model="mark-tests/no-such-model", max_length=32)
    with pytest.raises(ConfigError) as err:
        build_model_and_tokenizer(cfg, LABELS)
    message = str(err.value)
    assert message.startswith("model.base_model: cannot load 'mark-tests/no-such-model'")
    assert "minilm-local" in message and "\n" not in message


def test_max_length_beyond_the_encoder_is_refused():
    with pytest.raises(ConfigError, match="model.max_length: 1024 is more than"):
        build_model_and_tokenizer(ClassifierModelConfig(base_model="minilm-local", max_length=1024), LABELS)
