"""Bad requests get a 4xx with a JSON error (never a 500), keys are enforced (401), and a
model that is not trained is a 503 naming the command that trains it."""

from __future__ import annotations

import httpx
import pytest

from tests.api.fixtures import API_KEY

TRAIN = "python -m src.training.orchestrator train --target="


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


BAD_REQUESTS = [
    ("/rag-search", {"query": ""}, 422, "query"),
    ("/rag-search", {"query": "   "}, 422, "empty"),
    ("/rag-search", {"query": "json", "top_k": 0}, 422, "top_k"),
    ("/rag-search", {"query": "json", "top_k": 51}, 422, "top_k"),
    ("/rag-search", {"query": "json", "top_k": "5"}, 422, "top_k"),
    ("/rag-search", {"query": 42}, 422, "query"),
    ("/rag-search", {"query": "json", "mode": "fuzzy"}, 422, "mode"),
    ("/rag-search", {"query": "json", "extra": 1}, 422, "extra"),
    ("/rag-search", {"query": "x" * 2001}, 422, "query"),
    ("/rag-search", {}, 422, "query"),
    ("/rag-search", [1, 2], 422, "body"),
    ("/generate", {"prompt": "x", "model": "gpt-4"}, 422, "model"),
    ("/generate", {"prompt": "x", "max_new_tokens": 10_000}, 422, "max_new_tokens"),
    ("/generate", {"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("/generate", {"prompt": "x", "temperature": -1}, 422, "temperature"),
    ("/generate", {"prompt": "x", "top_p": 0}, 422, "top_p"),
    ("/generate", {"prompt": "x", "stream": "yes"}, 422, "stream"),
    ("/generate", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("/classify", {"text": "a", "texts": ["b"]}, 422, "exactly one"),
    ("/classify", {}, 422, "exactly one"),
    ("/classify", {"texts": []}, 422, "texts"),
    ("/classify", {"texts": ["ok", ""]}, 422, "texts"),
    ("/classify", {"texts": ["t"] * 65}, 422, "texts"),
    ("/query", {"query": "json", "top_k": 21}, 422, "top_k"),
    ("/v1/completions", {"model": "mamba", "prompt": "x", "max_tokens": 100_000}, 422, "max_tokens"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "gpt-4"),
    ("/v1/completions", {"model": "mamba", "prompt": [[]]}, 422, "prompt"),
    ("/v1/completions", {"model": "mamba", "prompt": [-1]}, 422, "prompt"),
    ("/v1/completions", {"model": "mamba", "prompt": "x", "logprobs": 6}, 422, "logprobs"),
    ("/v1/chat/completions", {"model": "mamba", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21}, 422, "top_logprobs"),
    ("/v1/chat/completions", {"model": "mamba", "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "mamba", "messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "nope"),
    ("/v1/embeddings", {"model": "minilm", "input": ""}, 422, "input"),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 3}, 400, "384"),
    ("/v1/embeddings", {"model": "ada-002", "input": "x"}, 404, "ada-002"),
]


@pytest.mark.parametrize("path,body,status,fragment", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_4xx_json_errors(server, path, body, status, fragment):
    assert_error(httpx.post(f"{server.url}{path}", json=body, timeout=60), status, fragment)


def test_malformed_json_unknown_paths_and_methods(server):
    assert_error(httpx.post(f"{server.url}/generate", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    assert_error(httpx.get(f"{server.url}/no-such-endpoint"), 404)
    assert_error(httpx.get(f"{server.url}/generate"), 405)


def test_prompt_over_the_token_limit_is_400(server):
    prompt = " ".join(f"w{i}" for i in range(2400))  # ~13k characters, far more than 4096 tokens here
    assert_error(httpx.post(f"{server.url}/generate", json={"prompt": prompt}, timeout=60), 400, "tokens")


def test_oversized_body_is_413(keyed_server):
    headers = {"X-API-Key": API_KEY}
    big = {"query": "x" * 30_000}
    assert_error(httpx.post(f"{keyed_server.url}/rag-search", json=big, headers=headers), 413, "20000 bytes")

    def chunks():  # no Content-Length: the guard counts what arrives
        for _ in range(30):
            yield b"x" * 1000

    assert_error(httpx.post(f"{keyed_server.url}/rag-search", content=chunks(), headers=headers), 413)


def test_api_key_is_required_as_bearer_or_header(keyed_server):
    url = keyed_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{url}/models", headers=headers)
        assert_error(response, 401, "API key")
        assert response.headers["www-authenticate"] == "Bearer"
    # The key is checked before the body is read: a bad body without a key is still 401.
    assert_error(httpx.post(f"{url}/generate", content=b"{bad"), 401)
    assert httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{url}/models", headers={"X-API-Key": API_KEY}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # liveness needs no key


@pytest.mark.parametrize(
    "path,body,target",
    [
        ("/generate", {"prompt": "hello"}, "mamba"),
        ("/generate", {"prompt": "hello", "model": "rlhf"}, "rlhf"),
        ("/classify", {"text": "hello"}, "transformer"),
        ("/rag-search", {"query": "hello"}, "rag"),
        ("/query", {"query": "hello"}, "mamba"),
        ("/v1/completions", {"model": "mamba", "prompt": "hello"}, "mamba"),
        ("/v1/chat/completions", {"model": "rlhf", "messages": [{"role": "user", "content": "hi"}]}, "rlhf"),
        ("/v1/embeddings", {"model": "minilm", "input": "hello"}, "rag"),
    ],
)
def test_untrained_model_is_503_naming_the_training_command(keyed_server, path, body, target):
    response = httpx.post(f"{keyed_server.url}{path}", json=body, headers={"X-API-Key": API_KEY}, timeout=60)
    error = assert_error(response, 503, f"{TRAIN}{target}`", "not trained")
    assert error["type"] == "model_not_trained"


def test_untrained_models_are_listed_as_such(keyed_server):
    headers = {"X-API-Key": API_KEY}
    models = httpx.get(f"{keyed_server.url}/models", headers=headers).json()["models"]
    assert {m["name"]: m["status"] for m in models} == {n: "not_trained" for n in ("mamba", "rlhf", "transformer", "rag")}
    assert all(f"{TRAIN}" in m["error"] for m in models)
    assert httpx.get(f"{keyed_server.url}/v1/models", headers=headers).json()["data"] == []


def test_rlhf_not_trained_on_the_full_server_too(server):
    assert_error(httpx.post(f"{server.url}/generate", json={"prompt": "x", "model": "rlhf"}), 503, f"{TRAIN}rlhf`")
