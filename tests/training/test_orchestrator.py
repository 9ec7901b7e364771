"""The orchestrator CLI: targets, help, one-line errors, in-process dispatch."""

import subprocess
import sys
from pathlib import Path

import pytest

from src.core.errors import MarkError
from src.training import orchestrator

REPO = Path(__file__).resolve().parents[2]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "src.training.orchestrator", *args], capture_output=True, text=True, cwd=REPO)


def test_help_documents_targets_options_and_examples():
    proc = _cli("train", "--help")
    assert proc.returncode == 0
    for word in [*orchestrator.TARGETS, "--config", "--device", "--resume", "--evaluate", "examples:"]:
        assert word in proc.stdout


def test_unknown_target_lists_the_valid_ones():
    proc = _cli("train", "--target=gpt5")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown target 'gpt5'; valid targets: " + ", ".join(orchestrator.TARGETS)


def test_unbuilt_target_is_one_line(monkeypatch):
    monkeypatch.setitem(orchestrator.TARGETS, "ghost", ("src.scripts.train_ghost", "not there"))
    with pytest.raises(MarkError, match=r"target 'ghost' is not built yet"):
        orchestrator.load_target("ghost")


def test_options_become_the_entry_points_arguments(monkeypatch):
    seen = {}

    class FakeModule:  # records what the orchestrator passes to a component's main()
        @staticmethod
        def main(argv):
            seen["argv"] = argv
            return {"ok": True}

    monkeypatch.setattr(orchestrator, "load_target", lambda target: FakeModule)
    result = orchestrator.main(["train", "--target=rag", "--config=c.yaml", "--device=cpu", "--resume", "--evaluate",
                                "training.batch_size=2", "--stages", "build_rag"])
    assert result == {"ok": True}
    assert seen["argv"] == ["--config", "c.yaml", "--device", "cpu", "--resume", "--evaluate",
                            "training.batch_size=2", "--stages", "build_rag"]
