"""POST /v1/score: the RLHF reward model's scores over HTTP equal src.rlhf.load.load_reward_scorer's."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from src.rlhf.load import load_reward_scorer


def test_score_equals_the_reward_model_in_process(full_server, full_checkpoints):
    pairs = [
        {"prompt": "How do I read a JSON file?", "response": "Use json.load on the open file."},
        {"prompt": "How do I read a JSON file?", "response": "banana banana banana"},
        {"prompt": "Start a thread", "response": ""},
    ]
    response = httpx.post(f"{full_server.url}/v1/score", json={"input": pairs}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    scorer = load_reward_scorer(full_checkpoints / "rlhf", "cpu")
    expected = scorer.score([p["prompt"] for p in pairs], [p["response"] for p in pairs])
    np.testing.assert_allclose(body["scores"], expected, atol=1e-4)
    assert body["model"] == "reward" and len(set(np.round(body["scores"], 4))) == 3
    # One pair alone scores the same as in a batch.
    alone = httpx.post(f"{full_server.url}/v1/score", json={"input": pairs[1:2]}, timeout=60).json()["scores"]
    assert alone[0] == pytest.approx(body["scores"][1], abs=1e-4)


def test_score_without_a_reward_model_is_503_naming_the_command(server):
    response = httpx.post(f"{server.url}/v1/score", json={"input": [{"prompt": "x", "response": "y"}]}, timeout=60)
    assert response.status_code == 503, response.text
    assert "rlhf_pipeline" in response.json()["error"]["message"]
