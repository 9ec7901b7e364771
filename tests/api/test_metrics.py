"""Prometheus /metrics (src/api/metrics.py) on the real server: its counters move by exactly
what the requests did."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(server) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_and_latency(server):
    before = scrape(server)
    generated = prompt_tokens = 0
    for prompt in ("import", "class Queue", "def read("):
        body = httpx.post(f"{server.url}/generate", json={"prompt": prompt, "max_new_tokens": 6, "temperature": 0}, timeout=60).json()
        generated += body["completion_tokens"]
        prompt_tokens += body["prompt_tokens"]
    assert httpx.post(f"{server.url}/generate", json={"prompt": ""}).status_code == 422
    after = scrape(server)

    route = {"route": "/generate", "method": "POST"}
    assert value(after, "mark_http_requests_total", status="200", **route) - value(before, "mark_http_requests_total", status="200", **route) == 3
    assert value(after, "mark_http_requests_total", status="422", **route) - value(before, "mark_http_requests_total", status="422", **route) == 1
    assert value(after, "mark_http_request_duration_seconds_count", **route) - value(before, "mark_http_request_duration_seconds_count", **route) == 4
    assert value(after, "mark_http_request_duration_seconds_sum", **route) > value(before, "mark_http_request_duration_seconds_sum", **route)
    assert value(after, "mark_generated_tokens_total", model="mamba") - value(before, "mark_generated_tokens_total", model="mamba") == generated
    assert value(after, "mark_prompt_tokens_total", model="mamba") - value(before, "mark_prompt_tokens_total", model="mamba") == prompt_tokens
    assert value(after, "mark_generation_tokens_per_second", model="mamba") > 0
    assert ("mark_queue_depth", (("worker", "generate:mamba"),)) in after
    assert value(after, "mark_running_batch_size", model="mamba") == 0  # nothing decoding now
    unmatched = dict(route="unmatched", method="GET", status="404")  # unknown paths share one label
    httpx.get(f"{server.url}/no/such/path")
    assert value(scrape(server), "mark_http_requests_total", **unmatched) - value(after, "mark_http_requests_total", **unmatched) == 1
