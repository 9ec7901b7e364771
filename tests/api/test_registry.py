"""Which models the server uses and from where (src/api/registry.py)."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from src.api.registry import ModelRegistry
from src.core.errors import NotTrainedError


def test_models_load_once_even_when_asked_from_many_threads(tiny_checkpoints):
    registry = ModelRegistry(tiny_checkpoints, device="cpu")
    assert registry.status("mamba")["status"] == "available"
    barrier = threading.Barrier(8)
    loaded = []

    def ask():
        barrier.wait()
        loaded.append(registry.get("mamba"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loaded) == 8 and all(m is loaded[0] for m in loaded)
    status = registry.status("mamba")
    assert status["status"] == "loaded" and status["source"] == str(tiny_checkpoints / "mamba" / "best_model.pt")
    assert status["details"]["parameters"] == loaded[0].model.num_parameters()


def test_an_export_directory_is_served_instead_of_the_checkpoints(tiny_checkpoints, tmp_path):
    export = tmp_path / "export"
    (export / "mamba").mkdir(parents=True)
    shutil.copy(tiny_checkpoints / "mamba" / "best_model.pt", export / "mamba" / "best_model.pt")
    (export / "manifest.json").write_text(json.dumps({"format": "mark-export", "models": {}}))
    registry = ModelRegistry(tmp_path / "unused", export_dir=export, device="cpu")
    assert registry.get("mamba").source == export / "mamba" / "best_model.pt"
    with pytest.raises(NotTrainedError, match="orchestrator train --target=rag"):
        registry.get("rag")
    assert registry.status("transformer")["status"] == "not_trained"


def test_a_model_trained_after_startup_is_found_on_the_next_request(tiny_checkpoints, tmp_path):
    registry = ModelRegistry(tmp_path, device="cpu")
    with pytest.raises(NotTrainedError, match="orchestrator train --target=mamba"):
        registry.get("mamba")
    shutil.copytree(tiny_checkpoints / "mamba", tmp_path / "mamba")
    assert registry.get("mamba").details["d_model"] == 32


def test_grounded_answers_use_the_aligned_model_when_one_is_trained(tiny_checkpoints, tmp_path):
    from src.core.checkpoint import load_checkpoint, save_checkpoint

    registry = ModelRegistry(tiny_checkpoints, device="cpu")
    assert registry.answer_model() == registry.answer_model("auto") == "mamba"  # no rlhf/ here
    assert registry.answer_model("rlhf") == "rlhf"  # an explicit choice is kept
    # An aligned model (any Mamba saved as the RLHF export) switches "auto" to it.
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, checkpoints)
    base = load_checkpoint(checkpoints / "mamba" / "best_model.pt")
    save_checkpoint({"kind": "rlhf", "model": base["model"], "extra": base["extra"]}, checkpoints / "rlhf" / "rlhf_final_model.pt")
    aligned = ModelRegistry(checkpoints, device="cpu")
    assert aligned.answer_model() == "rlhf" and aligned.answer_model("mamba") == "mamba"
    assert aligned.get("rlhf").model.num_parameters() == aligned.get("mamba").model.num_parameters()
