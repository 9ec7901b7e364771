"""Fixtures of the RL tests: a real RAG index over a few short sample documents, built once.

Embedding all 189 sample documents takes minutes on 2 cores; the 40 shortest (about 45 KB,
under 100 chunks) and the eval queries answered by them take seconds and still give the
retrieval environment real dense, BM25 and hybrid rankings to choose between.

``tests/rl/conftest.py`` and ``tests/scripts/test_train_rl.py`` both import these fixtures;
the index and table are built once per process (``_BUILT``) whichever asks first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from src.core.config import load_config
from src.rl.config import RLConfig
from src.rl.retrieval_env import TABLE_FILE, action_table, load_or_build_retrieval_table

SUBSET_DOCS = 40
REPO = Path(__file__).resolve().parents[2]
_BUILT: dict[str, object] = {}


@pytest.fixture(scope="session")
def rl_data_dir(sample_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``documents.jsonl`` + ``rag_eval.jsonl`` of the ``SUBSET_DOCS`` shortest sample documents."""
    if "data" in _BUILT:
        return _BUILT["data"]
    docs = [json.loads(line) for line in (sample_data_dir / "documents.jsonl").read_text().splitlines() if line.strip()]
    chosen = sorted(docs, key=lambda d: (len(d["text"]), d["id"]))[:SUBSET_DOCS]
    ids = {d["id"] for d in chosen}
    examples = [json.loads(line) for line in (sample_data_dir / "rag_eval.jsonl").read_text().splitlines() if line.strip()]
    examples = [ex for ex in examples if set(ex["relevant_docs"]) <= ids]
    out = tmp_path_factory.mktemp("rl_data")
    (out / "documents.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chosen))
    (out / "rag_eval.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    _BUILT["data"] = out
    return out


@pytest.fixture(scope="session")
def rl_rag_index(rl_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RAG index over ``rl_data_dir``, built by the RAG component's own entry point."""
    from src.scripts import train_rag_indexer

    if "index" in _BUILT:
        return _BUILT["index"]
    out = tmp_path_factory.mktemp("rl_rag")
    train_rag_indexer.main([
        "--config", str(REPO / "configs" / "rag_indexer.yaml"), "--device", "cpu",
        f"data.documents_file={rl_data_dir / 'documents.jsonl'}", f"data.eval_file={rl_data_dir / 'rag_eval.jsonl'}",
        f"paths.checkpoint_dir={out / 'index'}", f"paths.log_dir={out / 'logs'}", "training.show_progress=false",
    ])
    _BUILT["index"] = out / "index"
    return out / "index"


@pytest.fixture(scope="session")
def rl_table(rl_rag_index: Path, rl_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The retrieval table of the default actions over ``rl_rag_index``, cached in a session folder."""
    if "table" not in _BUILT:
        cache = tmp_path_factory.mktemp("rl_table_cache")
        env = load_config(REPO / "configs" / "rl_train.yaml", RLConfig).env  # the runs' own action set
        actions = action_table(env.modes, env.k_choices)
        _BUILT["table"] = load_or_build_retrieval_table(rl_rag_index, rl_data_dir / "rag_eval.jsonl", actions, cache_dir=cache, device="cpu")
        _BUILT["table_cache"] = cache / TABLE_FILE
    return _BUILT["table"]


@pytest.fixture(scope="session")
def rl_retriever(rl_rag_index: Path):
    """The test index opened for search (``load_rag_index``), shared by the session."""
    from src.rag.load import load_rag_index

    if "retriever" not in _BUILT:
        _BUILT["retriever"] = load_rag_index(rl_rag_index, device="cpu")
    return _BUILT["retriever"]


def rl_run_args(root: Path, name: str = "run", **overrides) -> list[str]:
    """Command-line arguments of a small, fast RL run on the test index, writing under
    ``root / name``. Its checkpoint folder starts with the session's cached retrieval table
    (same index, queries and actions), so a run does not embed the queries again.
    Needs the ``rl_table`` fixture to have run."""
    checkpoint_dir = root / name / "ckpt"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(_BUILT["table_cache"], checkpoint_dir / TABLE_FILE)
    values = {
        "data.rag_index_dir": _BUILT["index"],
        "data.eval_file": _BUILT["data"] / "rag_eval.jsonl",
        "paths.checkpoint_dir": checkpoint_dir,
        "paths.log_dir": root / name / "logs",
        "training.total_timesteps": 2000,
        "training.n_envs": 2,
        "training.n_steps": 125,
        "training.batch_size": 50,
        "training.save_freq": 500,
        "training.show_progress": "false",
        "model.hidden_dim": 64,
        "system.device": "cpu",
        **overrides,
    }
    return ["--config", str(REPO / "configs" / "rl_train.yaml")] + [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def rl_config_args(rl_table, tmp_path: Path):
    """:func:`rl_run_args` under the test's ``tmp_path``."""
    return lambda name="run", **overrides: rl_run_args(tmp_path, name, **overrides)
