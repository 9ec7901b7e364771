"""``load_model``: every model trained by the tiny pipeline, from its checkpoints and from the
export, plus the one-line ``NotTrainedError`` for a model that is not there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src.core import load_model
from src.core.errors import CheckpointError, ConfigError, NotTrainedError
from src.core.load_model import MODEL_NAMES, MODELS, resolve_source
from tests.pipelines.fixtures import REPO, tiny_data_dir, tiny_pipeline  # noqa: F401

CHECKPOINT_DIRS = {"mamba": "mamba", "transformer": "transfer", "rag": "rag", "rl": "rl", "rlhf": "rlhf"}


@pytest.fixture(scope="module")
def checkpoints(tiny_pipeline) -> dict[str, Path]:
    return {name: tiny_pipeline["work"] / "checkpoints" / folder for name, folder in CHECKPOINT_DIRS.items()}


@pytest.fixture(scope="module")
def export_dir(tiny_pipeline) -> Path:
    return tiny_pipeline["output_dir"] / "export"


def test_load_model_is_the_function_not_its_module():
    import src.core

    assert callable(src.core.load_model) and src.core.load_model.__name__ == "load_model"
    assert set(MODEL_NAMES) == {"mamba", "transformer", "rag", "rl", "rlhf"}


def test_importing_src_core_does_not_import_torch():
    # src.core is imported by every command, the data preparation included: it must stay light.
    code = "import sys; from src.core import load_model; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("source", ["checkpoints", "export"])
def test_language_models_generate_logits(source, checkpoints, export_dir):
    for name in ("mamba", "rlhf"):
        model, tokenizer, device = load_model(name, checkpoints[name] if source == "checkpoints" else export_dir, device="cpu")
        assert type(model).__name__ == "MambaLM" and not model.training and device == torch.device("cpu")
        ids = tokenizer.encode("The json module encodes")
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), model.args.vocab_size) and torch.isfinite(logits).all()


def test_exported_weights_equal_the_checkpoint_weights(checkpoints, export_dir):
    from_checkpoint, _, _ = load_model("mamba", checkpoints["mamba"] / "best_model.pt", device="cpu")
    from_export, _, _ = load_model("mamba", export_dir, device="cpu")
    for (name, a), (_, b) in zip(from_checkpoint.state_dict().items(), from_export.state_dict().items()):
        assert torch.equal(a, b), name


def test_transformer_is_a_predictor_with_its_tokenizer(checkpoints, export_dir):
    for source in (checkpoints["transformer"], export_dir):
        classifier, tokenizer, device = load_model("transformer", source, device="cpu")
        assert tokenizer is classifier.tokenizer and device.type == "cpu"
        predictions = classifier.predict(["Open a TCP connection and send an HTTP request.", "Parse a CSV file."])
        assert len(predictions) == 2
        for prediction in predictions:
            assert prediction["label"] in classifier.label_names
            assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_rag_is_a_retriever_over_the_index(checkpoints, export_dir, tiny_data_dir):
    import json

    first = json.loads((tiny_data_dir / "rag_eval.jsonl").read_text().splitlines()[0])
    for source in (checkpoints["rag"], export_dir):
        retriever, tokenizer, _ = load_model("rag", source, device="cpu")
        assert type(retriever).__name__ == "Retriever" and tokenizer is retriever.index.encoder.tokenizer
        results = retriever.search(first["query"], top_k=5, mode="bm25")
        assert len(results) == 5
        assert set(first["relevant_docs"]) & {r.doc_id for r in results}


def test_rl_is_a_policy_without_tokenizer(checkpoints, export_dir):
    for source in (checkpoints["rl"], checkpoints["rl"] / "final_model.pt", export_dir):
        policy, tokenizer, device = load_model("rl", source, device="cpu")
        assert type(policy).__name__ == "RLPolicy" and tokenizer is None and policy.timesteps == 500
        action = policy.act(np.zeros(policy.obs_dim, dtype=np.float32))
        assert 0 <= int(action) < policy.architecture["action_space"]["n"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_an_untrained_model_names_the_command_that_trains_it(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the standard checkpoints/ folders do not exist here
    for source in (None, tmp_path):
        with pytest.raises(NotTrainedError) as err:
            load_model(name, source)
        message = str(err.value)
        assert "\n" not in message and f"the {name} model" in message
        assert f"python -m src.training.orchestrator train --target={MODELS[name].target}" in message
    with pytest.raises(NotTrainedError, match=MODELS[name].default_dir):
        load_model(name)


def test_an_export_without_the_model_is_not_trained(export_dir, tmp_path):
    import shutil

    partial = tmp_path / "export"
    shutil.copytree(export_dir, partial, ignore=shutil.ignore_patterns("rl"))
    assert resolve_source("mamba", partial) == partial / "mamba" / "best_model.pt"
    with pytest.raises(NotTrainedError, match="the export holds no such model"):
        load_model("rl", partial)


def test_a_damaged_checkpoint_or_unknown_name_is_one_line(checkpoints, tmp_path):
    broken = tmp_path / "best_model.pt"
    broken.write_bytes((checkpoints["mamba"] / "best_model.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt, truncated or unsafe"):
        load_model("mamba", broken, device="cpu")
    with pytest.raises(CheckpointError):  # a classifier checkpoint is not a Mamba model
        load_model("mamba", checkpoints["transformer"] / "best_model.pt", device="cpu")
    with pytest.raises(ConfigError, match="unknown model 'gpt5'; valid names: mamba, transformer, rag, rl, rlhf"):
        load_model("gpt5")
