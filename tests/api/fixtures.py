"""Tiny real models for the serving tests, built once per test session, and a real server.

``tiny_checkpoints``: a checkpoints folder (``mamba/``, ``rag/``, ``transfer/``) trained
with MARK's own entry points on small slices of the sample corpus. ``start_server``
runs ``python -m src.api.main`` in a subprocess on a free loopback port.

``tests/api/conftest.py`` and ``tests/integrations/conftest.py`` both import these; the
builder is memoised in this module so a session that runs both builds the models once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
_BUILT: dict[str, Path] = {}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def rag_documents(sample_data_dir: Path, count: int = 12) -> list[dict]:
    """``count`` short real documents of the sample corpus (fast to embed)."""
    docs = _read_jsonl(sample_data_dir / "documents.jsonl")
    docs = sorted((d for d in docs if 400 <= len(d["text"]) <= 1500), key=lambda d: d["id"])
    return docs[:count]


def build_tiny_models(sample_data_dir: Path, root: Path) -> Path:
    """Train a tiny Mamba, index a few documents and fine-tune a tiny classifier into ``root/checkpoints``."""
    from src.scripts import train_mamba, train_rag_indexer, train_transfer

    data, ckpt, logs = root / "data", root / "checkpoints", root / "logs"
    data.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and leaves a core to the rest
    try:
        lm_docs = _read_jsonl(sample_data_dir / "lm_train.jsonl")
        train = [{**d, "text": d["text"][:3000]} for d in lm_docs[:8]]
        val = [{**d, "text": d["text"][:1500]} for d in lm_docs[8:10]]
        train_mamba.main([
            "--config", str(REPO / "configs/mamba_train.yaml"), "--device", "cpu",
            f"data.train_file={_write_jsonl(data / 'lm_train.jsonl', train)}",
            f"data.val_file={_write_jsonl(data / 'lm_val.jsonl', val)}",
            f"paths.checkpoint_dir={ckpt / 'mamba'}", f"paths.log_dir={logs / 'mamba'}",
            "model.vocab_size=300", "model.d_model=32", "model.n_heads=2", "model.n_layers=1",
            "model.state_size=16", "model.max_length=64", "model.chunk_size=16",
            "training.num_epochs=1", "training.batch_size=8", "training.warmup_steps=0",
            "training.learning_rate=0.005", "training.log_steps=50",
        ])
        train_rag_indexer.main([
            "--config", str(REPO / "configs/rag_indexer.yaml"), "--device", "cpu",
            f"data.documents_file={_write_jsonl(data / 'documents.jsonl', rag_documents(sample_data_dir))}",
            f"paths.checkpoint_dir={ckpt / 'rag'}", f"paths.log_dir={logs / 'rag'}",
            "training.show_progress=false", "retrieval.top_k=3",
        ])
        train_transfer.main([
            "--config", str(REPO / "configs/transfer_train.yaml"), "--device", "cpu",
            f"data.train_file={sample_data_dir / 'classification_train.jsonl'}",
            f"data.val_file={sample_data_dir / 'classification_val.jsonl'}",
            f"data.test_file={sample_data_dir / 'classification_test.jsonl'}",
            f"paths.checkpoint_dir={ckpt / 'transfer'}", f"paths.log_dir={logs / 'transfer'}",
            "model.max_length=32", "training.num_epochs=1", "training.batch_size=16",
            "data.max_train_examples=32", "data.max_eval_examples=16",
        ])
    finally:
        torch.set_num_threads(threads)
    return ckpt


@pytest.fixture(scope="session")
def tiny_checkpoints(sample_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``checkpoints/`` with ``mamba/``, ``rag/`` and ``transfer/`` (no ``rlhf/``)."""
    if "checkpoints" not in _BUILT:
        _BUILT["checkpoints"] = build_tiny_models(sample_data_dir, tmp_path_factory.mktemp("serving_models"))
    return _BUILT["checkpoints"]


def build_rlhf_models(sample_data_dir: Path, checkpoints: Path, root: Path) -> Path:
    """``root/checkpoints``: the tiny models of ``checkpoints`` plus ``rlhf/`` (the RLHF
    pipeline at test size on the tiny Mamba: SFT, reward model, PPO, export)."""
    import yaml

    from src.training import rlhf_pipeline
    from tests.rlhf.conftest import tiny_rlhf_config

    full = root / "checkpoints"
    full.mkdir(parents=True, exist_ok=True)
    for name in ("mamba", "rag", "transfer"):
        (full / name).symlink_to(checkpoints / name, target_is_directory=True)
    config = tiny_rlhf_config(checkpoints / "mamba" / "best_model.pt", sample_data_dir, root)
    config["paths"] = {"checkpoint_dir": str(full / "rlhf"), "log_dir": str(root / "logs")}
    config_file = root / "rlhf.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rlhf_pipeline.main(["--base-model", "mamba", "--config", str(config_file), "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    build_tiny_retrieval_policy(full, root)
    return full


def build_tiny_retrieval_policy(checkpoints: Path, root: Path) -> Path:
    """``checkpoints/rl/final_model.pt``: a tiny retrieval policy (PPO, 500 steps) trained on the
    RAG index of ``checkpoints`` with labeled queries made from its documents' sentences, so
    that ``mode: auto`` has a policy to run."""
    from src.data.readers import read_documents
    from src.rl.synthetic import synthetic_queries
    from src.scripts import train_rl

    documents = read_documents(Path(checkpoints / "rag").resolve().parent.parent / "data" / "documents.jsonl")
    labeled = synthetic_queries(documents, "sentence", keep_shared=1.0, per_document=3, seed=7)
    eval_file = root / "rag_eval_policy.jsonl"
    eval_file.write_text("".join(json.dumps({"query": q.query, "relevant_docs": list(q.relevance)}) + "\n" for q in labeled))
    train_rl.main([
        "--config", str(Path(__file__).resolve().parents[2] / "configs" / "rl_train.yaml"),
        f"data.rag_index_dir={checkpoints / 'rag'}", f"data.eval_file={eval_file}",
        f"paths.checkpoint_dir={checkpoints / 'rl'}", f"paths.log_dir={root / 'rl_logs'}", "training.total_timesteps=500",
        "training.n_envs=2", "training.n_steps=125", "training.batch_size=50", "training.show_progress=false",
        "model.hidden_dim=32", "system.device=cpu",
    ])
    return checkpoints / "rl" / "final_model.pt"


@pytest.fixture(scope="session")
def full_checkpoints(sample_data_dir: Path, tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``checkpoints/`` with every served model: the tiny ones and a tiny RLHF run (reward model included)."""
    if "full" not in _BUILT:
        _BUILT["full"] = build_rlhf_models(sample_data_dir, tiny_checkpoints, tmp_path_factory.mktemp("full_models"))
    return _BUILT["full"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """A ``python -m src.api.main`` subprocess on 127.0.0.1 (``url``, ``log``, ``stop()``)."""

    def __init__(self, checkpoints_dir: Path, log_path: Path, *extra: str, wait_for: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("MARK_API_KEY", None)
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "src.api.main", "--port", str(self.port), "--checkpoints-dir", str(checkpoints_dir),
             "--torch-threads", "1", "--log-level", "warning", *extra],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait(wait_for)

    def _wait(self, models: tuple[str, ...], timeout: float = 120.0) -> None:
        """Until /health answers and ``models`` are loaded (preloading runs in the background)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=2).json()
                if all(health["models"].get(m) == "loaded" for m in models) and (not models or health["ready"]):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server(tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory):
    """The server over the tiny models, without an API key."""
    running = RunningServer(
        tiny_checkpoints, tmp_path_factory.mktemp("server") / "server.log",
        wait_for=("mamba", "rag", "transformer"),
    )
    yield running
    running.stop()


@pytest.fixture(scope="session")
def full_server(full_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory):
    """The server over every tiny model (RLHF and reward model too), without an API key."""
    # --max-prompt-tokens: every prompt within the schema's length limits fits (a character is
    # at most 4 UTF-8 bytes, a byte-level BPE token at least one byte), so the fuzzer's longest
    # valid prompts are served rather than refused.
    running = RunningServer(
        full_checkpoints, tmp_path_factory.mktemp("full_server") / "server.log", "--max-prompt-tokens", "70000",
        wait_for=("mamba", "rlhf", "rag", "transformer"),
    )
    yield running
    running.stop()


API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory):
    """A server with ``--api-key API_KEY`` and a 20 kB body limit over an empty checkpoints
    folder: nothing is trained."""
    root = tmp_path_factory.mktemp("keyed")
    running = RunningServer(root / "checkpoints", root / "server.log", "--api-key", API_KEY, "--max-request-bytes", "20000")
    yield running
    running.stop()
