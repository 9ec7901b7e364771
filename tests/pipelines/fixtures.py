"""Tiny data, tiny configs and one tiny run of every pipeline stage, for the tests of the
full pipeline, ``load_model`` and the report.

The pipeline runs the real components; only the sizes are small: a 30-document slice of the
sample corpus, a 1-layer Mamba, MiniLM fine-tuned on 32 documents, an index of 30 short
documents, 500 PPO timesteps, and RLHF on a few pairs (about a minute on 2 cores).

``tests/pipelines/conftest.py``, ``tests/core/test_load_model.py`` and
``tests/training/test_report.py`` import these fixtures; the run happens once per process
(``_BUILT``) whichever asks first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

DOCS = 30
REPO = Path(__file__).resolve().parents[2]
ALL_STAGES = ["data_prep", "train_mamba", "train_transformer", "build_rag", "train_rl", "train_rlhf", "export_models"]
_BUILT: dict[str, object] = {}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def make_tiny_data(sample_data_dir: Path, out: Path) -> Path:
    """A consistent slice of the sample corpus (no ``manifest.json``: the pipeline validates
    it as the user's data and never rewrites it)."""
    out.mkdir(parents=True, exist_ok=True)
    docs = sorted(_jsonl(sample_data_dir / "documents.jsonl"), key=lambda d: (len(d["text"]), d["id"]))[:DOCS]
    ids = {d["id"] for d in docs}
    _write_jsonl(out / "documents.jsonl", docs)
    _write_jsonl(out / "lm_train.jsonl", docs[:24])
    _write_jsonl(out / "lm_val.jsonl", docs[24:])
    for name in ("rag_eval", "rag_eval_hard"):
        rag = [ex for ex in _jsonl(sample_data_dir / f"{name}.jsonl") if set(ex["relevant_docs"]) <= ids]
        _write_jsonl(out / f"{name}.jsonl", rag)
    for name, count in (("classification_train", 48), ("classification_val", 24), ("classification_test", 24),
                        ("sft_train", 48), ("sft_val", 16), ("sft_test", 16),
                        ("preferences_train", 48), ("preferences_val", 16), ("preferences_test", 16)):
        _write_jsonl(out / f"{name}.jsonl", _jsonl(sample_data_dir / f"{name}.jsonl")[:count])
    shutil.copy(sample_data_dir / "labels.json", out / "labels.json")
    return out


def tiny_configs(data_dir: Path, work: Path) -> dict[str, dict]:
    """Every stage's config at test size, writing under ``work``."""
    def paths(name: str) -> dict:
        return {"checkpoint_dir": str(work / "checkpoints" / name), "log_dir": str(work / "logs" / name)}

    system = {"device": "cpu", "seed": 0}
    return {
        "mamba_train.yaml": {
            "model": {"vocab_size": 300, "d_model": 32, "n_heads": 2, "n_layers": 1, "max_length": 64,
                      "state_size": 16, "chunk_size": 16},
            "training": {"batch_size": 8, "num_epochs": 1, "max_steps": 6, "learning_rate": 0.003, "log_steps": 2,
                         "torch_threads": 1},
            "data": {"train_file": str(data_dir / "lm_train.jsonl"), "val_file": str(data_dir / "lm_val.jsonl")},
            "paths": paths("mamba"), "system": system,
        },
        "transfer_train.yaml": {
            "model": {"base_model": "minilm-local", "num_labels": 3, "max_length": 32},
            "training": {"batch_size": 16, "num_epochs": 1, "learning_rate": 0.0002, "eval_batch_size": 32, "log_steps": 1},
            "data": {"train_file": str(data_dir / "classification_train.jsonl"),
                     "val_file": str(data_dir / "classification_val.jsonl"),
                     "test_file": str(data_dir / "classification_test.jsonl"),
                     "max_train_examples": 32, "max_eval_examples": 16},
            "paths": paths("transfer"), "system": system,
        },
        "rag_indexer.yaml": {
            "model": {"embedding_model": "minilm-local", "embedding_dim": 384, "chunk_size": 128, "chunk_overlap": 16},
            "retrieval": {"eval_modes": ["dense", "bm25"], "eval_top_k": [1, 5]},
            "training": {"batch_size": 32, "show_progress": False},
            "data": {"documents_file": str(data_dir / "documents.jsonl"), "eval_file": str(data_dir / "rag_eval.jsonl")},
            "paths": paths("rag"), "system": system,
        },
        "rl_train.yaml": {
            "model": {"hidden_dim": 32},
            "training": {"total_timesteps": 500, "n_envs": 2, "n_steps": 125, "batch_size": 50, "n_epochs": 2,
                         "save_freq": 250, "show_progress": False},
            "env": {"modes": ["dense", "bm25"], "k_choices": [1, 5]},
            "data": {"rag_index_dir": str(work / "checkpoints" / "rag"), "eval_file": str(data_dir / "rag_eval.jsonl")},
            "paths": paths("rl"), "system": system,
        },
        "rlhf.yaml": {
            "model": {"base_checkpoint": str(work / "checkpoints" / "mamba" / "best_model.pt"),
                      "max_prompt_tokens": 24, "max_response_tokens": 16},
            "training": {
                "sft": {"batch_size": 8, "num_epochs": 1, "max_train_examples": 32, "max_val_examples": 8, "log_steps": 2},
                "method": "ppo",  # the RLHF tests cover DPO and the encoder reward model
                "reward": {"backbone": "mamba", "batch_size": 8, "num_epochs": 1, "max_train_examples": 32, "max_val_examples": 8,
                           "normalization_examples": 16, "log_steps": 2},
                "ppo": {"num_steps": 2, "rollout_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1,
                        "max_new_tokens": 8, "save_steps": 0},
                "torch_threads": 1,
            },
            "evaluation": {"num_prompts": 8, "max_new_tokens": 8, "batch_size": 8, "samples_in_report": 2,
                           "cosine_baseline_model": None},
            "data": {**{f"sft_{s}_file": str(data_dir / f"sft_{s}.jsonl") for s in ("train", "val", "test")},
                     **{f"preferences_{s}_file": str(data_dir / f"preferences_{s}.jsonl") for s in ("train", "val", "test")}},
            "paths": paths("rlhf"), "system": system,
        },
    }


def write_configs(configs: dict[str, dict], config_dir: Path) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    for name, content in configs.items():
        (config_dir / name).write_text(yaml.safe_dump(content, sort_keys=False))
    return config_dir


def pipeline_args(run: dict, *extra: str) -> list[str]:
    """The command line of the tiny pipeline ``run`` (see :func:`tiny_pipeline`), plus ``extra``."""
    return ["--device", "cpu", "--config-dir", str(run["config_dir"]), "--data-dir", str(run["data_dir"]),
            "--output-dir", str(run["output_dir"]), *extra]


@pytest.fixture(scope="session")
def tiny_data_dir(sample_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`make_tiny_data` of the session's sample corpus."""
    if "data" not in _BUILT:
        _BUILT["data"] = make_tiny_data(sample_data_dir, tmp_path_factory.mktemp("tiny_data"))
    return _BUILT["data"]


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every stage of the full pipeline, run once at tiny size.

    Returns ``{"work", "config_dir", "data_dir", "output_dir", "summary"}``: checkpoints in
    ``work/checkpoints/<component>``, logs in ``work/logs/<component>``, the manifest, state,
    report and export in ``output_dir``."""
    if "pipeline" not in _BUILT:
        from src.pipelines import full_pipeline

        work = tmp_path_factory.mktemp("tiny_pipeline")
        run = {"work": work, "config_dir": write_configs(tiny_configs(tiny_data_dir, work), work / "configs"),
               "data_dir": tiny_data_dir, "output_dir": work / "out"}
        run["summary"] = full_pipeline.main(pipeline_args(run, "--stages", *ALL_STAGES))
        _BUILT["pipeline"] = run
    return _BUILT["pipeline"]
