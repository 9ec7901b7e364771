"""The layout's promises: every ``src/scripts/train_*.py`` is a thin shell over its component's
recipe, and ``src/`` has no import cycle (lazy imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "src" / "scripts").glob("train_*.py")) + [ROOT / "src" / "training" / "rlhf_pipeline.py"]
CYCLES_TOOL = ROOT.parent / "shared" / "tools" / "import_cycles.py"
RECIPES = {
    "train_mamba.py": "src.mamba.train",
    "train_transfer.py": "src.classifier.train",
    "train_rag_indexer.py": "src.rag.train",
    "train_rl.py": "src.rl.train",
    "rlhf_pipeline.py": "src.rlhf.train",
}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_a_shell_over_its_recipe(script: Path):
    source = script.read_text()
    assert len(source.splitlines()) <= 60, f"{script.name}: {len(source.splitlines())} lines"
    tree = ast.parse(source)
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert functions <= {"build_parser", "main", "run"}, functions
    assert "main" in functions
    imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert RECIPES[script.name] in imported, f"{script.name} does not call {RECIPES[script.name]}"


@pytest.mark.skipif(not CYCLES_TOOL.is_file(), reason="../shared/tools/import_cycles.py is not beside the repository")
def test_no_import_cycles_in_src():
    out = subprocess.run([sys.executable, str(CYCLES_TOOL), "src"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cycle" not in out.stdout, out.stdout
