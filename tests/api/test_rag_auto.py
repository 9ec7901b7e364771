"""``mode: auto`` on /rag-search and /query: the trained retrieval policy picks the search
strategy, the response says which; without a policy, a 503 naming the command that trains one."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from src.rl.load import load_rl_policy
from src.rl.model import retrieval_actions
from tests.api.fixtures import RunningServer, build_tiny_retrieval_policy

REPO = Path(__file__).resolve().parents[2]


def test_auto_without_a_policy_is_a_503_naming_the_command(server):
    response = httpx.post(f"{server.url}/rag-search", json={"query": "parse json", "mode": "auto"}, timeout=60)
    assert response.status_code == 503
    assert "train_rl" in response.json()["error"]["message"] and "rl/final_model.pt" in response.json()["error"]["message"]
    plain = httpx.post(f"{server.url}/rag-search", json={"query": "parse json", "mode": "convex-0.5", "top_k": 2}, timeout=60).json()
    assert plain["mode"] == "convex-0.5" and plain["strategy"] is None and len(plain["results"]) == 2


@pytest.fixture(scope="module")
def auto_server(tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny models plus a tiny retrieval policy trained on their RAG index, served."""
    root = tmp_path_factory.mktemp("auto")
    ckpt = root / "checkpoints"
    ckpt.mkdir()
    for name in ("mamba", "rag", "transfer"):
        (ckpt / name).symlink_to(tiny_checkpoints / name, target_is_directory=True)
    build_tiny_retrieval_policy(ckpt, root)
    running = RunningServer(ckpt, root / "server.log", wait_for=("mamba", "rag"))
    yield running, ckpt
    running.stop()


def test_rag_search_and_query_with_mode_auto_say_what_the_policy_chose(auto_server):
    server, ckpt = auto_server
    labels = {a.label: a for a in retrieval_actions(load_rl_policy(ckpt / "rl" / "final_model.pt"))}
    body = httpx.post(f"{server.url}/rag-search", json={"query": "How do I parse a JSON document?", "mode": "auto", "top_k": 4}, timeout=60)
    assert body.status_code == 200, body.text
    body = body.json()
    chosen = labels[body["strategy"]]  # one of the policy's own actions
    assert body["mode"] == chosen.mode and len(body["results"]) <= min(4, chosen.k)
    # the results are that mode's search, cut at the chosen k
    same = httpx.post(f"{server.url}/rag-search", json={"query": "How do I parse a JSON document?", "mode": chosen.mode,
                                                         "top_k": min(4, chosen.k)}, timeout=60).json()
    assert [h["doc_id"] for h in body["results"]] == [h["doc_id"] for h in same["results"]] and same["strategy"] is None
    answer = httpx.post(f"{server.url}/query", json={"query": "How do I parse a JSON document?", "mode": "auto", "max_new_tokens": 4},
                        timeout=120)
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    assert answer["strategy"] in labels and answer["mode"] == labels[answer["strategy"]].mode
    assert len(answer["sources"]) <= labels[answer["strategy"]].k
