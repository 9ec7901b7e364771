"""The RAG entry point: build + evaluate on real sample documents, resume, and one-line CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.core.cli import run_cli
from src.core.config import REPO_ROOT
from src.scripts import train_rag_indexer
from src.training import orchestrator

CONFIG = str(REPO_ROOT / "configs" / "rag_indexer.yaml")


def _overrides(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.documents_file={data_dir / 'documents.jsonl'}",
        f"data.eval_file={data_dir / 'rag_eval.jsonl'}",
        f"paths.checkpoint_dir={out / 'checkpoints'}",
        f"paths.log_dir={out / 'logs'}",
        "training.show_progress=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def sample_subset_dir(sample_data_dir: Path, tmp_path_factory) -> Path:
    """The 16 shortest sample documents over 2500 characters (several chunks each) and their eval queries."""
    docs = [json.loads(line) for line in (sample_data_dir / "documents.jsonl").read_text().splitlines() if line.strip()]
    chosen = sorted((d for d in docs if len(d["text"]) >= 2500), key=lambda d: (len(d["text"]), d["id"]))[:16]
    ids = {d["id"] for d in chosen}
    examples = [json.loads(line) for line in (sample_data_dir / "rag_eval.jsonl").read_text().splitlines() if line.strip()]
    out = tmp_path_factory.mktemp("rag_script_data")
    (out / "documents.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chosen))
    (out / "rag_eval.jsonl").write_text(
        "".join(json.dumps(ex) + "\n" for ex in examples if set(ex["relevant_docs"]) <= ids)
    )
    return out


@pytest.fixture(scope="module")
def built(sample_subset_dir, tmp_path_factory):
    """One build with --evaluate of the shipped config over the sample subset."""
    out = tmp_path_factory.mktemp("rag_run")
    summary = train_rag_indexer.main(["--config", CONFIG, "--device", "cpu", "--evaluate", *_overrides(sample_subset_dir, out)])
    return out, summary


def test_build_and_evaluate_writes_index_metrics_and_logs(built, sample_subset_dir):
    out, summary = built
    ckpt = out / "checkpoints"
    for name in ("faiss_index", "metadata", "config", "eval_metrics", "eval_plot"):
        assert Path(summary["outputs"][name]).is_file(), name
    assert summary["outputs"]["faiss_index"] == str(ckpt / "faiss.index")
    assert summary["outputs"]["metadata"] == str(ckpt / "metadata.json")

    metrics = summary["metrics"]
    num_docs = sum(1 for line in (sample_subset_dir / "documents.jsonl").read_text().splitlines() if line.strip())
    assert metrics["num_documents"] == num_docs and metrics["num_chunks"] > num_docs
    report = json.loads((ckpt / "eval_metrics.json").read_text())
    fusions = ["hybrid", "convex-0.25", "convex-0.5", "convex-0.75"]
    assert set(report["modes"]) == set(report["val_modes"]) == {"dense", "bm25", *fusions}
    dense = report["modes"]["dense"]
    total = sum(1 for line in (sample_subset_dir / "rag_eval.jsonl").read_text().splitlines() if line)
    split = report["split"]
    assert dense["num_queries"] == split["test_queries"] and split["val_queries"] + split["test_queries"] == total
    assert split["val_queries"] == round(0.5 * total) and report["val_modes"]["dense"]["num_queries"] == split["val_queries"]
    # the hybrid fusion is chosen on val (recall@5, then nDCG@5), and reported with its test numbers
    val = report["val_modes"]
    best = max(fusions, key=lambda m: (val[m]["recall@5"], val[m]["ndcg@5"], -fusions.index(m)))
    assert report["hybrid_selected"] == best == metrics["hybrid_selected"]
    assert metrics["hybrid_selected/recall@5"] == report["modes"][best]["recall@5"]
    assert metrics["recall@5"] == dense["recall@5"] and metrics["bm25/mrr"] == report["modes"]["bm25"]["mrr"]
    # Each query has one relevant document out of 16: chance would give recall@5 = 5/16.
    assert dense["recall@5"] > 0.6 and dense["recall@1"] <= dense["recall@3"] <= dense["recall@5"]
    assert dense["hit_rate@5"] == dense["recall@5"]

    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["build"] + ["eval"] * 6
    assert records[0]["num_chunks"] == metrics["num_chunks"]
    assert "retrieval metrics" in (out / "logs" / "train.log").read_text()


def test_resume_through_the_orchestrator_embeds_nothing_new(built, sample_subset_dir):
    out, summary = built
    metadata_before = json.loads((out / "checkpoints" / "metadata.json").read_text())
    resumed = orchestrator.main(["train", "--target=rag", "--config", CONFIG, "--resume", *_overrides(sample_subset_dir, out)])
    assert resumed["metrics"]["embedded_documents"] == 0
    assert resumed["metrics"]["num_chunks"] == summary["metrics"]["num_chunks"]
    assert json.loads((out / "checkpoints" / "metadata.json").read_text()) == metadata_before
    assert not (out / "checkpoints" / "eval_metrics.json").exists()  # stale metrics are removed


def test_resume_with_other_chunking_is_a_one_line_error(built, sample_subset_dir, capsys):
    out, _ = built
    argv = ["--config", CONFIG, "--resume", *_overrides(sample_subset_dir, out, "model.chunk_size=100")]
    assert run_cli(train_rag_indexer.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "chunk_size=200, the config says 100" in err[-1]


def test_wrong_embedding_dim_is_a_config_error(sample_subset_dir, tmp_path, capsys):
    argv = ["--config", CONFIG, *_overrides(sample_subset_dir, tmp_path, "model.embedding_dim=768")]
    assert run_cli(train_rag_indexer.main, argv) == 2
    assert "model.embedding_dim: 768, but 'sentence-transformers/all-MiniLM-L6-v2' outputs 384" in capsys.readouterr().err


def test_cli_bad_key_exits_2_with_one_line(sample_subset_dir, tmp_path):
    cmd = [sys.executable, "-m", "src.scripts.train_rag_indexer", "--config", CONFIG, "index.kind=flat",
           *_overrides(sample_subset_dir, tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {CONFIG}: index.kind: unknown key"]


def test_eval_split_is_seeded_disjoint_and_independent_of_order():
    from src.rag.eval import EvalQuery, split_eval_queries

    queries = [EvalQuery(str(i), f"question {i}", {f"d{i}": 1}) for i in range(41)]
    val, test = split_eval_queries(queries, 0.5, seed=42)
    assert len(val) == 20 and len(test) == 21 and not {q.query_id for q in val} & {q.query_id for q in test}
    assert [q.query_id for q in val] == sorted((q.query_id for q in val), key=int)  # file order kept
    again, _ = split_eval_queries(list(reversed(queries)), 0.5, seed=42)
    assert {q.query_id for q in again} == {q.query_id for q in val}
    other, _ = split_eval_queries(queries, 0.5, seed=1)
    assert {q.query_id for q in other} != {q.query_id for q in val}


def test_hybrid_fusions_must_fuse(sample_subset_dir, tmp_path, capsys):
    argv = ["--config", CONFIG, *_overrides(sample_subset_dir, tmp_path, "retrieval.hybrid_fusions=[hybrid,convex-1]")]
    assert run_cli(train_rag_indexer.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "hybrid_fusions: convex-1 ranks by one score only" in err[-1]
