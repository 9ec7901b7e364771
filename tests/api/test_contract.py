"""The HTTP contract (src/api/schemas.py, src/api/app.py): schemathesis fuzzes the real server
with every check against its own /openapi.json, and out-of-range inputs are 422s naming
the field."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from src.api.schemas import MAX_SEED

SCHEMATHESIS = Path(sys.executable).parent / "st"
HUGE_SEED = 34545995904588980224  # the value that used to raise ValueError inside (a 500)


def test_schemathesis_finds_nothing_with_all_checks(full_server, tmp_path):
    """``st run --checks all`` over every operation (coverage and fuzzing phases), a bounded
    number of examples each, fixed seed (a generous request timeout: this is about correctness, not
    latency, on a shared 2-core box): no 5xx, no schema-valid request refused, no invalid
    one accepted, every status code, content type and body as documented."""
    began = time.monotonic()
    result = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{full_server.url}/openapi.json", "--checks", "all", "--max-examples", "3",
         "--workers", "4", "--seed", "15", "--no-color",
         "--request-timeout", "120"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    print(f"schemathesis: {time.monotonic() - began:.0f}s\n{output[-1500:]}")
    assert result.returncode == 0, output[-6000:]
    assert "15 passed" in output or "passed" in output.split("SUMMARY")[-1]
    assert "failures" not in output.split("SUMMARY")[-1].lower()


@pytest.mark.parametrize(
    "path,body",
    [
        ("/query", {"query": "parse a CSV file", "seed": HUGE_SEED}),
        ("/generate", {"prompt": "import", "seed": HUGE_SEED}),
        ("/v1/chat/completions", {"model": "mamba", "messages": [{"role": "user", "content": "hi"}], "seed": HUGE_SEED}),
        ("/v1/completions", {"model": "mamba", "prompt": "x", "seed": -1}),
    ],
)
def test_seed_out_of_range_is_422_naming_it(server, path, body):
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "seed" and "seed" in error["message"]


def test_largest_seed_is_served(server):
    body = {"model": "mamba", "prompt": "import", "max_tokens": 4, "seed": MAX_SEED, "n": 2}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2


def test_integers_are_json_integers(server):
    ok = httpx.post(f"{server.url}/rag-search", json={"query": "json", "top_k": 2.0}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2
    for value in ("2", True, 2.5):
        bad = httpx.post(f"{server.url}/rag-search", json={"query": "json", "top_k": value}, timeout=60)
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "top_k", (value, bad.text)


def test_the_schema_states_what_validation_enforces(server, tiny_checkpoints):
    from src.mamba import load_mamba

    _, tokenizer = load_mamba(tiny_checkpoints / "mamba", "cpu")
    spec = httpx.get(f"{server.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    seed = next(s for s in schemas["GenerateRequest"]["properties"]["seed"]["anyOf"] if s.get("type") == "integer")
    assert (seed["minimum"], seed["maximum"]) == (0, MAX_SEED)
    assert [b["required"] for b in schemas["ClassifyRequest"]["oneOf"]] == [["text"], ["texts"]]
    assert schemas["RagSearchRequest"]["properties"]["query"]["pattern"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    token_ids = next(p for p in prompt if p.get("type") == "array" and p["items"].get("type") == "integer")
    assert token_ids["items"]["maximum"] == tokenizer.vocab_size - 1  # the loaded model's vocabulary
    dims = next(s for s in schemas["EmbeddingRequest"]["properties"]["dimensions"]["anyOf"] if s.get("type") == "integer")
    assert dims["minimum"] == dims["maximum"] == 384
    generate = spec["paths"]["/generate"]["post"]["responses"]
    assert {"application/json", "text/event-stream"} <= set(generate["200"]["content"])
    assert {"400", "401", "413", "422", "500", "503", "504"} <= set(generate)
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
