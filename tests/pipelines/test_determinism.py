"""Same seed, same machine, same config: the tiny full pipeline run twice, each in a fresh
interpreter with a different ``PYTHONHASHSEED``, gives exactly the same metrics in every
stage's manifest row (Mamba, classifier, RAG with FAISS, SB3 PPO, RLHF with sampling).

Only wall-clock measurements (``*seconds``, ``*per_second``) are left out: they measure the
machine, not the model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipelines.fixtures import ALL_STAGES, REPO, make_tiny_data, tiny_configs, write_configs

TIMING = re.compile(r"(^|_)seconds$|per_second$")


def flatten(metrics: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def comparable_metrics(manifest: dict) -> dict[str, object]:
    """Every metric of every stage (``stage/metric``), wall-clock timings left out."""
    out = {}
    for row in manifest["stages"]:
        for key, value in flatten(row["metrics"]).items():
            if not TIMING.search(key.rsplit("/", 1)[-1]):
                out[f"{row['stage']}/{key}"] = value
    return out


def test_timing_filter_keeps_the_model_metrics():
    manifest = {"stages": [{"stage": "s", "metrics": {"train_seconds": 1.0, "docs_per_second": 2.0, "bm25": {"seconds": 3},
                                                      "timesteps": 500, "val_loss": 0.5, "recall@5": 1.0}}]}
    assert comparable_metrics(manifest) == {"s/timesteps": 500, "s/val_loss": 0.5, "s/recall@5": 1.0}


@pytest.mark.slow
def test_tiny_full_pipeline_twice_gives_identical_metrics(sample_data_dir, tmp_path):
    data = make_tiny_data(sample_data_dir, tmp_path / "data")
    manifests = []
    for run, hash_seed in (("first", "1"), ("second", "2")):
        work = tmp_path / run
        config_dir = write_configs(tiny_configs(data, work), work / "configs")
        proc = subprocess.run(
            [sys.executable, "-m", "src.pipelines.full_pipeline", "--device", "cpu", "--config-dir", str(config_dir),
             "--data-dir", str(data), "--output-dir", str(work / "out"), "--stages", *ALL_STAGES],
            capture_output=True, text=True, cwd=REPO, timeout=1500, env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifests.append(json.loads((work / "out" / "pipeline_manifest.json").read_text()))
    first, second = (comparable_metrics(m) for m in manifests)
    assert len(first) > 80  # every stage's metrics, nested evaluation tables included
    for stage in ("train_mamba", "train_transformer", "build_rag", "train_rl", "train_rlhf"):
        assert any(k.startswith(stage + "/") for k in first), stage
    differing = {k: (first.get(k), second.get(k)) for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    assert not differing, differing
