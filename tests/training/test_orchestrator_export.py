"""``mark export`` (src/training/orchestrator.py -> src/pipelines/export.py:export_model):
a trained model written as an HF folder or a GGUF file from the command line."""

import json

import pytest

from src.core.cli import run_cli
from tests.pipelines.fixtures import tiny_data_dir, tiny_pipeline  # noqa: F401
from src.training import orchestrator


def test_export_command_writes_hf_and_gguf_from_a_checkpoint_or_an_export(tiny_pipeline, tmp_path):
    from gguf import GGUFReader

    work, export = tiny_pipeline["work"], tiny_pipeline["output_dir"] / "export"
    summary = orchestrator.main(["export", "--model", "mamba", "--format", "hf", "--output", str(tmp_path / "hf"),
                                 "--source", str(work / "checkpoints" / "mamba")])
    assert summary["outputs"]["hf"] == str(tmp_path / "hf") and summary["metrics"]["max_abs_diff"] <= 1e-4
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mamba2"

    summary = orchestrator.main(["export", "--model", "rlhf", "--format", "gguf", "--dtype", "f16",
                                 "--output", str(tmp_path / "gguf"), "--source", str(export)])
    path = tmp_path / "gguf" / "rlhf-f16.gguf"
    assert summary["outputs"]["gguf"] == str(path)
    assert GGUFReader(path).fields["general.architecture"].contents() == "mamba2"

    orchestrator.main(["export", "--model", "transformer", "--format", "hf", "--output", str(tmp_path / "cls"),
                       "--source", str(export)])
    assert "id2label" in json.loads((tmp_path / "cls" / "config.json").read_text())


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "transformer", "--format", "gguf"], "the classifier has no GGUF form"),
        (["--model", "mamba", "--format", "hf", "--source", "{tmp}/nothing"], "the mamba model (Mamba language model) is not trained"),
    ],
)
def test_export_command_errors_are_one_line_exit_2(argv, expected, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = run_cli(orchestrator.main, ["export", *argv, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and expected in err and "\n" not in err
    assert not (tmp_path / "out").exists()
