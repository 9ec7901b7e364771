"""The real API server (a ``python -m src.api.main`` subprocess on loopback) over tiny real
models, spoken to over HTTP: every MARK endpoint, streaming and concurrency."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from src.mamba import generate, generate_ids, load_mamba

LABELS = {"text_and_data", "networking_and_web", "system_and_concurrency"}


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, **kwargs)


def indexed_docs(checkpoints: Path) -> list[dict]:
    path = checkpoints.parent / "data" / "documents.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture(scope="module")
def tiny_lm(tiny_checkpoints):
    return load_mamba(tiny_checkpoints / "mamba", "cpu")


def test_health_and_models_say_what_is_loaded_from_where(server, tiny_checkpoints):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["uptime_s"] >= 0
    assert health["models"] == {"mamba": "loaded", "rlhf": "not_trained", "transformer": "loaded", "rag": "loaded"}

    models = {m["name"]: m for m in httpx.get(f"{server.url}/models").json()["models"]}
    assert models["mamba"]["source"] == str(tiny_checkpoints / "mamba" / "best_model.pt")
    assert models["rag"]["source"] == str(tiny_checkpoints / "rag")
    for name in ("mamba", "transformer", "rag"):
        assert models[name]["status"] == "loaded"
        assert models[name]["trained_at"].endswith("+00:00") and models[name]["loaded_at"]
    assert models["mamba"]["details"]["parameters"] > 0 and models["mamba"]["details"]["d_model"] == 32
    assert models["rag"]["details"]["documents"] == len(indexed_docs(tiny_checkpoints))
    assert set(models["transformer"]["details"]["labels"]) == LABELS
    assert models["rlhf"]["status"] == "not_trained"
    assert "python -m src.training.orchestrator train --target=rlhf" in models["rlhf"]["error"]


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_rag_search_finds_the_document_a_passage_comes_from(server, tiny_checkpoints, mode):
    doc = indexed_docs(tiny_checkpoints)[3]
    passage = doc["text"][:200]
    response = post(server, "/rag-search", {"query": passage, "top_k": 3, "mode": mode})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == mode and body["query"] == passage
    results = body["results"]
    assert len(results) == 3 and [r["rank"] for r in results] == [1, 2, 3]
    assert results[0]["doc_id"] == doc["id"]
    assert results[0]["text"] in doc["text"]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


def test_generate_greedy_equals_in_process_generation(server, tiny_lm):
    model, tokenizer = tiny_lm
    expected = generate(model, tokenizer, "import", max_new_tokens=20, temperature=0)
    body = post(server, "/generate", {"prompt": "import", "max_new_tokens": 20, "temperature": 0}).json()
    assert body["text"] == expected
    assert body["model"] == "mamba"
    assert body["prompt_tokens"] == 1 + len(tokenizer.encode("import"))
    assert 1 <= body["completion_tokens"] <= 20
    assert body["finish_reason"] == ("length" if body["completion_tokens"] == 20 else "stop")


def test_generate_same_seed_same_text_and_stop_strings(server):
    request = {"prompt": "The json module", "max_new_tokens": 40, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    first, second = (post(server, "/generate", request).json() for _ in range(2))
    assert first["text"] == second["text"]
    full = post(server, "/generate", {**request, "temperature": 0}).json()["text"]
    stop = full.strip()[:3] if len(full.strip()) >= 3 else None
    if stop:  # cut at the first occurrence of a string the greedy text contains
        cut = post(server, "/generate", {**request, "temperature": 0, "stop": [stop]}).json()
        assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_generate_streams_server_sent_events(server):
    request = {"prompt": "Return the", "max_new_tokens": 24, "temperature": 0}
    whole = post(server, "/generate", request).json()
    with httpx.stream("POST", f"{server.url}/generate", json={**request, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    done = events[-2]
    pieces = [e["text"] for e in events[:-2]]
    assert done["done"] is True and done["finish_reason"] == whole["finish_reason"]
    assert "".join(pieces) == done["text"] == whole["text"]
    assert len(pieces) > 1  # really streamed, piece by piece


def test_classify_one_text_or_many(server):
    texts = [
        "Open a socket to the HTTP server and read the response headers.",
        "Acquire the lock before two threads touch the shared counter.",
        "Split the string into words and strip the whitespace.",
    ]
    one = post(server, "/classify", {"text": texts[0]}).json()
    many = post(server, "/classify", {"texts": texts}).json()
    assert len(one["predictions"]) == 1 and len(many["predictions"]) == 3
    for prediction in one["predictions"] + many["predictions"]:
        assert prediction["label"] in LABELS and set(prediction["probabilities"]) == LABELS
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
    for label in LABELS:  # the same text alone or in a batch: the same probabilities
        assert one["predictions"][0]["probabilities"][label] == pytest.approx(many["predictions"][0]["probabilities"][label], abs=1e-4)


def test_query_answers_from_the_retrieved_documents(server, tiny_checkpoints):
    doc = indexed_docs(tiny_checkpoints)[5]
    question = doc["text"][:160]
    response = post(server, "/query", {"query": question, "top_k": 2, "max_new_tokens": 12})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [s["doc_id"] for s in body["sources"]][0] == doc["id"]
    assert len(body["sources"]) == 2
    assert body["doc_ids"] and body["doc_ids"][0] == doc["id"]
    assert set(body["doc_ids"]) <= {s["doc_id"] for s in body["sources"]}
    assert isinstance(body["answer"], str) and body["finish_reason"] in ("stop", "length")


def test_concurrent_requests_all_succeed_and_generation_is_batched(server):
    def one(i: int) -> int:
        if i % 3 == 0:
            return post(server, "/rag-search", {"query": f"read a file {i}", "top_k": 2}).status_code
        if i % 3 == 1:
            return post(server, "/classify", {"text": f"open a socket number {i}"}).status_code
        return post(server, "/generate", {"prompt": "import", "max_new_tokens": 32, "temperature": 1.0, "seed": i}).status_code

    with ThreadPoolExecutor(max_workers=24) as pool:
        statuses = list(pool.map(one, range(48)))
    assert statuses == [200] * 48
    stats = httpx.get(f"{server.url}/models").json()["generation"]["mamba"]
    assert stats["max_batch_rows"] > 1


def test_a_client_that_leaves_a_stream_cancels_its_generation(server, tiny_lm):
    model, tokenizer = tiny_lm
    # A prompt whose greedy continuation does not end by itself within 512 tokens.
    def runs_to_the_limit(prompt: str) -> bool:
        ids = generate_ids(model, [[tokenizer.bos_id] + tokenizer.encode(prompt)], 512, temperature=0, eos_id=tokenizer.eos_id)[0]
        return len(ids) == 512 and ids[-1] != tokenizer.eos_id

    prompt = next(p for p in ("import", "The", "def", "class", "Return", "os.path") if runs_to_the_limit(p))
    began = time.monotonic()

    def stats() -> dict:
        return httpx.get(f"{server.url}/models").json()["generation"]["mamba"]

    before = stats()["cancelled"]
    request = {"prompt": prompt, "max_new_tokens": 512, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/generate", json=request, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first piece; closing the response drops the connection
    deadline = time.monotonic() + 20
    while stats()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    after = stats()
    print(f"prompt {prompt!r}; cancelled {time.monotonic() - began:.1f}s after the request")
    assert after["cancelled"] == before + 1 and after["active"] == 0


def test_query_says_when_the_answer_is_empty_or_cut_off_and_gives_evidence(server, tiny_checkpoints):
    from src.rag.load import load_rag_index

    doc = indexed_docs(tiny_checkpoints)[2]
    question = " ".join(doc["text"].split()[:12])
    body = post(server, "/query", {"query": question, "top_k": 3, "max_new_tokens": 4, "evidence_k": 4}).json()
    assert body["answer_empty"] == (body["answer"] == "")
    assert body["answer_cut_off"] == (body["finish_reason"] == "length")
    evidence = body["evidence"]
    assert 1 <= len(evidence) <= 4
    sources = {s["doc_id"]: " ".join(s["text"].split()) for s in body["sources"]}
    for item in evidence:  # extractive: sentences of the retrieved chunks, with their documents
        assert item["doc_id"] in sources and item["sentence"] in sources[item["doc_id"]]
    scores = [e["score"] for e in evidence]
    assert scores == sorted(scores, reverse=True)
    # The scores are the RAG encoder's cosine similarities.
    encoder = load_rag_index(tiny_checkpoints / "rag", device="cpu").index.encoder
    vectors = encoder.encode([question] + [e["sentence"] for e in evidence])
    np.testing.assert_allclose(scores, vectors[1:] @ vectors[0], atol=1e-4)
    assert evidence[0]["doc_id"] == doc["id"]  # the question's own document holds the best sentence

    cut = post(server, "/query", {"query": question, "max_new_tokens": 1, "temperature": 0}).json()
    if cut["finish_reason"] == "length":
        assert cut["answer_cut_off"] is True
    none = post(server, "/query", {"query": question, "evidence_k": 0, "max_new_tokens": 2}).json()
    assert none["evidence"] == []


def test_tokenize_and_detokenize_round_trip(server, tiny_lm):
    _, tokenizer = tiny_lm
    text = "import json\nnaïve → ✓"
    body = post(server, "/tokenize", {"prompt": text}).json()
    assert body["tokens"] == [tokenizer.bos_id] + tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 4096 and body["token_strs"][0] == "<|bos|>"
    bare = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == body["tokens"][1:]
    assert post(server, "/detokenize", {"tokens": bare["tokens"]}).json()["prompt"] == text
    assert post(server, "/detokenize", {"tokens": body["tokens"]}).json()["prompt"] == "<|bos|>" + text
    out_of_vocab = post(server, "/detokenize", {"tokens": [tokenizer.vocab_size]})
    assert out_of_vocab.status_code == 400 and out_of_vocab.json()["error"]["param"] == "tokens"
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["vocab_size"]) == ("<|bos|>", "<|eos|>", tokenizer.vocab_size)
    assert post(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"] == [tokenizer.eos_id]


def test_a_search_issued_while_a_large_embeddings_request_runs_returns_before_it(server):
    """Search queries and /v1/embeddings share the encoder, but in different lanes: a
    /rag-search sent while 256 long texts are being embedded waits for one sub-batch of them,
    not for all (src.api.batching)."""
    words = "open the socket send the request read the response headers and close the connection".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(50)) for i in range(128)]
    finished: dict[str, float] = {}

    def timed(name: str, path: str, body: dict) -> httpx.Response:
        response = post(server, path, body)
        finished[name] = time.perf_counter()
        return response

    with ThreadPoolExecutor(2) as pool:
        start = time.perf_counter()
        bulk = pool.submit(timed, "embeddings", "/v1/embeddings", {"model": "minilm", "input": texts})
        time.sleep(0.5)  # the bulk request is being embedded
        search = pool.submit(timed, "search", "/rag-search", {"query": "how do I read a response header?", "top_k": 3})
        assert search.result(120).status_code == 200 and len(search.result().json()["results"]) == 3
        embeddings = bulk.result(120)
    assert embeddings.status_code == 200 and len(embeddings.json()["data"]) == 128
    bulk_s, search_s = finished["embeddings"] - start, finished["search"] - start - 0.5
    assert finished["search"] < finished["embeddings"]
    assert search_s < bulk_s / 3, (search_s, bulk_s)
