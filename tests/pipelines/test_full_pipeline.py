"""``python -m src.pipelines.full_pipeline`` end to end at tiny size: every stage, the manifest,
the export, skip-when-current, ``--force``, upstream changes, failures, data preparation and
the orchestrator's ``--target=full-pipeline``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.core.checkpoint import file_sha256
from src.core.cli import run_cli
from src.core.errors import ConfigError
from src.pipelines import full_pipeline
from src.pipelines.full_pipeline import MANIFEST_FILE, StageFailedError
from src.pipelines.state import STATE_FILE
from src.training import orchestrator
from tests.pipelines.fixtures import ALL_STAGES, REPO, pipeline_args, tiny_configs, write_configs


def _rows(summary: dict) -> dict[str, dict]:
    return {row["stage"]: row for row in summary["stages"]}


def test_every_stage_runs_and_the_manifest_describes_it(tiny_pipeline):
    out, summary = tiny_pipeline["output_dir"], tiny_pipeline["summary"]
    rows = _rows(summary)
    assert list(rows) == ALL_STAGES
    assert rows["data_prep"]["status"] == "skipped" and rows["data_prep"]["note"] == "your data, validated"
    assert {rows[s]["status"] for s in ALL_STAGES[1:]} == {"ran"}

    metrics = summary["metrics"]
    assert metrics["data_prep"]["documents"] == 30 and metrics["data_prep"]["files"] == 15
    assert math.isfinite(metrics["train_mamba"]["best_val_loss"]) and metrics["train_mamba"]["global_step"] == 6
    assert metrics["train_transformer"]["global_step"] == 2  # 32 examples / batch 16, one epoch
    assert 0 <= metrics["train_transformer"]["test_accuracy"] <= 1
    assert metrics["build_rag"]["num_documents"] == 30 and metrics["build_rag"]["recall@5"] >= 0.9
    assert metrics["train_rl"]["timesteps"] == 500
    assert 0 <= metrics["train_rlhf"]["evaluation"]["ppo_win_rate_vs_sft"] <= 1
    assert metrics["export_models"]["models"] == ["mamba", "rag", "rl", "rlhf", "transformer"]
    assert rows["build_rag"]["key_metric"].startswith("rag_eval recall@5 ")
    assert rows["train_rl"]["key_metric"].startswith("test reward ")  # not the val split's
    exported = metrics["train_rlhf"]["export"]["policy"]
    assert rows["train_rlhf"]["key_metric"].startswith(f"{exported.upper()} test win rate vs SFT ")
    # The targets table: each baseline is the one the stage itself measured, on a named split.
    targets = {(t["stage"], t["metric"]): t for t in summary["targets"]}
    assert targets["train_mamba", "perplexity"]["baseline"] == metrics["train_mamba"].get("kn3_val_perplexity")
    assert targets["train_mamba", "perplexity"]["split"] == "val"
    assert targets["train_transformer", "macro-F1"]["baseline"] == metrics["train_transformer"].get("tfidf_macro_f1")
    rm = targets["train_rlhf", "reward-model accuracy"]  # (no cosine baseline in the tiny config: "?")
    assert rm["value"] == metrics["train_rlhf"]["evaluation"]["reward_model_test_accuracy"] and rm["split"].startswith("test (")

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "completed" and manifest["stages_selected"] == ALL_STAGES
    assert [r["stage"] for r in manifest["stages"]] == ALL_STAGES
    assert manifest["packages"]["torch"] and manifest["machine"]["cpus"] >= 1
    by_stage = {r["stage"]: r for r in manifest["stages"]}
    assert by_stage["train_mamba"]["config"] == str(tiny_pipeline["config_dir"] / "mamba_train.yaml")
    assert by_stage["train_mamba"]["metrics"]["best_val_loss"] == pytest.approx(metrics["train_mamba"]["best_val_loss"])
    assert by_stage["build_rag"]["log"] == str(tiny_pipeline["work"] / "logs" / "rag" / "train.log")

    state = json.loads((out / STATE_FILE).read_text())["stages"]
    assert set(state) == set(ALL_STAGES[1:])
    rl_inputs = state["train_rl"]["fingerprint"]["inputs"]
    assert str(tiny_pipeline["work"] / "checkpoints" / "rag") in rl_inputs  # the RL stage depends on the index
    assert str(tiny_pipeline["work"] / "checkpoints" / "mamba" / "best_model.pt") in state["train_rlhf"]["fingerprint"]["inputs"]

    report = out / "report" / "report.md"
    assert summary["outputs"]["report"] == str(report) and "## rlhf" in report.read_text()


def test_export_holds_every_model_with_checksums_and_versions(tiny_pipeline):
    export = tiny_pipeline["output_dir"] / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["format"] == "mark-export" and manifest["not_trained"] == []
    assert manifest["packages"]["python"] and manifest["packages"]["faiss-cpu"]
    expected_files = {
        "mamba": {"best_model.pt", "vocab.json", "config.yaml"},
        "transformer": {"best_model.pt", "config.yaml", "test_metrics.json", "confusion_matrix.png"},
        "rag": {"faiss.index", "metadata.json", "store.sqlite", "config.yaml", "eval_metrics.json", "eval_metrics.png"},
        "rl": {"final_model.pt", "config.yaml", "eval_metrics.json", "eval_metrics.png"},
        "rlhf": {"rlhf_final_model.pt", "evaluation.json", "evaluation.md", "evaluation.png"},
    }
    assert set(manifest["models"]) == set(expected_files)
    for name, entry in manifest["models"].items():
        assert expected_files[name] <= set(entry["files"]), name
        for file_name, record in entry["files"].items():
            assert file_sha256(export / name / file_name) == record["sha256"] == file_sha256(record["source"])
        assert entry["load_check"]["ok"] and entry["config_hash"] and entry["metrics"]
    assert manifest["models"]["mamba"]["load_check"]["class"] == "MambaLM"
    assert manifest["models"]["transformer"]["load_check"]["class"] == "DocumentClassifier"
    assert manifest["models"]["rag"]["load_check"]["chunks"] > 30
    assert manifest["models"]["rl"]["metrics"]["timesteps"] == 500


def test_rerun_skips_current_stages_force_and_changes_rerun_them(tiny_pipeline, capsys):
    run = tiny_pipeline
    # 1. Nothing changed: every stage is skipped, and says so.
    again = _rows(full_pipeline.main(pipeline_args(run, "--stages", *ALL_STAGES, "--no-report")))
    assert {again[s]["status"] for s in ALL_STAGES} == {"skipped"}
    assert all(again[s]["note"] == "current" for s in ALL_STAGES[1:])
    printed = capsys.readouterr().out
    assert "skipped (current)" in printed and "Start the API server: python -m src.api.main" in printed
    assert again["train_rl"]["key_metric"] == _rows(run["summary"])["train_rl"]["key_metric"]

    # 2. --force reruns what is selected, and nothing else.
    forced = _rows(full_pipeline.main(pipeline_args(run, "--stages", "train_rl", "--force", "--no-report")))
    assert forced["train_rl"]["status"] == "ran"

    # 3. A changed config reruns its stage, and the stages that read its outputs.
    config_path = run["config_dir"] / "mamba_train.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["training"]["max_steps"] = 4
    config_path.write_text(yaml.safe_dump(config))
    changed = _rows(full_pipeline.main(pipeline_args(run, "--stages", "train_mamba", "train_rlhf", "export_models", "--no-report")))
    assert [changed[s]["status"] for s in ("train_mamba", "train_rlhf", "export_models")] == ["ran", "ran", "ran"]
    assert changed["train_mamba"]["metrics"]["global_step"] == 4
    log_text = (run["output_dir"] / "pipeline.log").read_text()
    assert "train_mamba: running (config changed)" in log_text
    assert "train_rlhf: running (inputs changed" in log_text

    # 4. An output changed behind the pipeline's back (e.g. a single `mark train`) reruns its stage.
    (run["work"] / "checkpoints" / "rl" / "eval_metrics.json").write_text("{}")
    assert _rows(full_pipeline.main(pipeline_args(run, "--stages", "train_rl", "--no-report")))["train_rl"]["status"] == "ran"


def test_a_failing_stage_names_itself_and_its_log(tiny_data_dir, tmp_path):
    configs = tiny_configs(tiny_data_dir, tmp_path)
    configs["rl_train.yaml"]["data"]["rag_index_dir"] = str(tmp_path / "no_index_here")
    config_dir = write_configs({"rl_train.yaml": configs["rl_train.yaml"]}, tmp_path / "configs")
    args = ["--config-dir", str(config_dir), "--data-dir", str(tiny_data_dir), "--output-dir", str(tmp_path / "out"),
            "--stages", "train_rl", "export_models"]
    log_path = tmp_path / "logs" / "rl" / "train.log"
    with pytest.raises(StageFailedError) as failure:
        full_pipeline.main(args)
    message = str(failure.value)
    assert message.startswith("stage train_rl failed: ") and message.endswith(f"(traceback and log: {log_path})")
    assert "\n" not in message and failure.value.exit_code == 2  # the component's own one-line error
    assert "Traceback (most recent call last)" in log_path.read_text()
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["status"] == "failed" and [r["status"] for r in manifest["stages"]] == ["failed"]
    assert manifest["stages"][0]["log"] == str(log_path)

    # From the command line: the last line says it all, the exit code is non-zero.
    proc = subprocess.run([sys.executable, "-m", "src.pipelines.full_pipeline", *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage train_rl failed: ") and str(log_path) in last
    assert "Traceback" not in proc.stderr


def test_a_bug_in_a_component_is_one_line_with_exit_code_1(tiny_data_dir, tmp_path, monkeypatch):
    from src.scripts import train_mamba

    def broken_run(cfg, resume=False, evaluate=False):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(train_mamba, "run", broken_run)
    config_dir = write_configs({"mamba_train.yaml": tiny_configs(tiny_data_dir, tmp_path)["mamba_train.yaml"]}, tmp_path / "configs")
    argv = ["--config-dir", str(config_dir), "--output-dir", str(tmp_path / "out"), "--stages", "train_mamba"]
    assert run_cli(full_pipeline.main, argv) == 1
    assert "ZeroDivisionError" in (tmp_path / "logs" / "mamba" / "train.log").read_text()
    assert "ZeroDivisionError" in (tmp_path / "out" / "pipeline.log").read_text()


def test_data_prep_writes_the_sample_data_once_and_never_overwrites_users_files(tmp_path):
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--output-dir", str(tmp_path / "out"), "--stages", "data_prep", "--no-report"]
    first = _rows(full_pipeline.main(args))["data_prep"]
    assert first["status"] == "ran" and first["note"] == "sample data written"
    assert (data / "manifest.json").is_file() and first["metrics"]["files"] == 15 and first["metrics"]["documents"] > 100
    second = _rows(full_pipeline.main(args))["data_prep"]
    assert second["status"] == "skipped" and second["note"] == "sample data up to date, validated"

    partial = tmp_path / "mine"
    partial.mkdir()
    (partial / "documents.jsonl").write_text('{"id": "a", "text": "my own document"}\n')
    with pytest.raises(StageFailedError, match=r"^stage data_prep failed: .*documents.jsonl exist but were not written by prepare"):
        full_pipeline.main(["--data-dir", str(partial), "--output-dir", str(tmp_path / "out2"), "--stages", "data_prep"])
    assert (partial / "documents.jsonl").read_text() == '{"id": "a", "text": "my own document"}\n'


def test_the_orchestrator_target_forwards_device_and_stages(tiny_data_dir, tmp_path):
    summary = orchestrator.main(["train", "--target=full-pipeline", "--device=cpu", "--stages", "data_prep",
                                 "--data-dir", str(tiny_data_dir), "--output-dir", str(tmp_path / "out")])
    assert [row["stage"] for row in summary["stages"]] == ["data_prep"]
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["device"] == "cpu" and manifest["status"] == "completed"


def test_stage_selection_keeps_pipeline_order_and_checks_options(tmp_path):
    parse = lambda *argv: full_pipeline.options_from_args(full_pipeline.build_parser().parse_args(list(argv)))
    assert parse("--stages", "export_models", "train_mamba").stages == ["train_mamba", "export_models"]
    assert parse("--skip-data-prep").stages == ALL_STAGES[1:]
    assert parse().stages == ALL_STAGES and parse().config_dir == Path("configs")
    with pytest.raises(ConfigError, match="no stage left"):
        parse("--stages", "data_prep", "--skip-data-prep")
    config_file = tmp_path / "one.yaml"
    config_file.write_text("model: {}\n")
    with pytest.raises(ConfigError, match="reads a folder of configs"):
        parse("--config", str(config_file))
    with pytest.raises(SystemExit):
        parse("--stages", "train_gpt5")


def test_cuda_without_a_gpu_fails_before_any_stage(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="'cuda' was asked for but no CUDA device is available"):
        full_pipeline.main(["--device", "cuda", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_config_missing_from_the_config_dir_comes_from_configs(tmp_path):
    from src.pipelines.stages import resolve_config_path

    assert resolve_config_path(tmp_path, "rag_indexer.yaml").resolve() == (REPO / "configs" / "rag_indexer.yaml").resolve()
    (tmp_path / "rag_indexer.yaml").write_text("x: 1\n")
    assert resolve_config_path(tmp_path, "rag_indexer.yaml") == tmp_path / "rag_indexer.yaml"
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config_path(tmp_path, "nothing.yaml")


def test_demo_configs_exist_for_every_stage_or_fall_back():
    from src.pipelines.stages import TRAIN_STAGES, resolve_config_path

    for stage in TRAIN_STAGES.values():
        assert resolve_config_path(REPO / "configs" / "demo", stage.config_file).is_file(), stage.name

