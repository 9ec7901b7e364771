"""Load test of the API server: N concurrent clients on loopback for a bounded time.

Starts ``python -m src.api.main`` on a free 127.0.0.1 port over the given checkpoints (or
export), waits until its models are loaded, then runs ``--clients`` concurrent clients.
Each client sends one request at a time, cycling through the endpoints (client ``i``
starts at endpoint ``i``, so every endpoint is under load at once), until ``--duration``
seconds have passed or ``--max-requests`` have been sent. Reports per endpoint: requests,
errors (any non-2xx status or transport error), throughput, p50/p99/max latency, and the
p99 of the requests sent after the first ``SETTLE_S`` (8) s of each round (the load without
its cold start; the goal is judged on the whole run).
Goal: 0 errors at 64 clients; ``/rag-search`` p99 <= 1 s and ``/query`` p99 <= 3 s.

With ``--baseline REF`` the server of git revision ``REF`` (``git archive`` into a
temporary folder, same models, same settings) runs next to this working tree's; the load
alternates between them in ``--rounds`` rounds each (A B B A ...), and the table gains the
ratios of each endpoint's p50 and p99 latency and throughput: a comparison that holds on a
shared, noisy machine where absolute numbers do not.

    python bench/api_load.py --checkpoints-dir checkpoints [--clients 64] [--duration 30]
        [--max-requests 5000] [--endpoints health rag-search generate classify query chat completions embeddings tokenize score]
        [--embedding-inputs 2] [--baseline main] [--server-args="--embedding-workers 2"]
    python bench/api_load.py --url http://127.0.0.1:8000 ...     # a server already running here

Writes ``bench/results/api_load.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from src.core.checkpoint import atomic_write_json  # noqa: E402

QUERIES = [
    "How do I serialize a Python object to a JSON string?",
    "Which function compresses data with bzip2?",
    "How can I start a new thread?",
    "Parse a URL into its components",
    "Read and write CSV files",
    "How do I match a regular expression at the start of a string?",
    "Create a temporary directory",
    "Send an email message over SMTP",
    "Compute the SHA-256 digest of some bytes",
    "How do I run a subprocess and capture its output?",
    "Decode base64 data",
    "Schedule a coroutine on the event loop",
]
PROMPTS = ["Return the", "The json module", "Open a file and", "class Queue", "def read(", "This function"]
TEXTS = [
    "Open a socket connection to the server, send the HTTP request and read the response headers.",
    "Split the string into tokens and return a list of the words without the separators.",
    "Acquire the lock before touching the shared counter so that two threads never race.",
]
# endpoint name -> (method, path, model the endpoint needs)
ENDPOINTS = {
    "health": ("GET", "/health", None),
    "rag-search": ("POST", "/rag-search", "rag"),
    "generate": ("POST", "/generate", "mamba"),
    "classify": ("POST", "/classify", "transformer"),
    "query": ("POST", "/query", "mamba+rag"),
    "chat": ("POST", "/v1/chat/completions", "mamba"),
    "completions": ("POST", "/v1/completions", "mamba"),
    "embeddings": ("POST", "/v1/embeddings", "rag"),
    "tokenize": ("POST", "/tokenize", "mamba"),
    "score": ("POST", "/v1/score", "rlhf"),
}


def request_body(endpoint: str, n: int, max_new_tokens: int, embedding_inputs: int = 2) -> dict | None:
    """The ``n``-th request body of ``endpoint`` (varied, deterministic)."""
    query, prompt, text = QUERIES[n % len(QUERIES)], PROMPTS[n % len(PROMPTS)], TEXTS[n % len(TEXTS)]
    if endpoint == "rag-search":
        return {"query": query, "top_k": 5}
    if endpoint == "generate":
        return {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.8, "top_p": 0.95, "seed": n}
    if endpoint == "classify":
        return {"texts": [text, query]} if n % 2 else {"text": text}
    if endpoint == "query":
        return {"query": query, "top_k": 3, "max_new_tokens": max_new_tokens}
    if endpoint == "chat":
        return {"model": "mamba", "messages": [{"role": "user", "content": query}], "max_tokens": max_new_tokens, "temperature": 0.7}
    if endpoint == "completions":  # with logprobs and echo, as evaluation harnesses ask
        return {"model": "mamba", "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0.7, "seed": n, "logprobs": 1, "echo": n % 2 == 0}
    if endpoint == "embeddings":
        texts = [f"{TEXTS[(n + i) % len(TEXTS)]} ({i})" for i in range(embedding_inputs - 1)]
        return {"model": "minilm", "input": [query] + texts}
    if endpoint == "tokenize":
        return {"prompt": query}
    if endpoint == "score":
        return {"input": [{"prompt": query, "response": text}]}
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, log_path: Path, code: Path = REPO_ROOT, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """``python -m src.api.main`` of the source tree ``code`` on a free loopback port."""
    port = free_port()
    command = [sys.executable, "-m", "src.api.main", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if args.export_dir:
        command += ["--export-dir", str(args.export_dir.resolve())]
    else:
        command += ["--checkpoints-dir", str(args.checkpoints_dir.resolve())]
    if args.torch_threads:
        command += ["--torch-threads", str(args.torch_threads)]
    command += list(extra)
    env = {**os.environ, "PYTHONPATH": str(code)}
    env.pop("MARK_API_KEY", None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(command, cwd=code, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def checkout(ref: str, into: Path) -> Path:
    """The files of git revision ``ref`` of this repository, written under ``into``."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=REPO_ROOT, capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--baseline {ref}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float = 300.0) -> dict:
    """/health once every trained model is loaded (not 'available' any more) and the server
    says it is ready (warmed up; a server without ``ready`` counts as ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            health = httpx.get(f"{url}/health", timeout=5).json()
            if all(state != "available" for state in health["models"].values()) and health.get("ready", True):
                return health
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not ready after {timeout:.0f}s")


async def run_load(
    url: str, endpoints: list[str], clients: int, duration: float, max_requests: int, max_new_tokens: int, timeout: float,
    embedding_inputs: int = 2,
) -> tuple[dict, float]:
    """Run the clients; returns ({endpoint: [(latency_s, ok, status_or_error, sent_at_s)]}, wall seconds)."""
    records: dict[str, list[tuple[float, bool, str, float]]] = {e: [] for e in endpoints}
    sent = 0
    # One connection per client, each in its own httpx client: a single pool shared by 64
    # concurrent clients queues requests in the pool itself (measured: a /health the server
    # answered in < 50 ms took up to 4 s at the client).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)

    async def one_client(index: int, client: httpx.AsyncClient) -> None:
        nonlocal sent
        turn = index
        async with client:
            while time.perf_counter() < stop_at and sent < max_requests:
                endpoint = endpoints[turn % len(endpoints)]
                method, path, _ = ENDPOINTS[endpoint]
                body = request_body(endpoint, sent, max_new_tokens, embedding_inputs)
                sent += 1
                turn += 1
                began = time.perf_counter()
                try:
                    response = await client.request(method, path, json=body)
                    ok, status = response.is_success, str(response.status_code)
                    if not ok:
                        status += f" {response.text[:200]}"
                except httpx.HTTPError as err:
                    ok, status = False, f"{type(err).__name__}: {err}"[:200]
                records[endpoint].append((time.perf_counter() - began, ok, status, began - start))

    # Made before the clock starts: each client's set-up (its SSL context) takes tens of ms.
    connections = [httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) for _ in range(clients)]
    start = time.perf_counter()
    stop_at = start + duration
    await asyncio.gather(*(one_client(i, c) for i, c in enumerate(connections)))
    return records, time.perf_counter() - start


SETTLE_S = 8.0  # "p99 after settling": requests sent this long after the load started


def summarise(records: dict, wall: float) -> dict:
    rows = {}
    everything = []
    for endpoint, items in records.items():
        everything += items
        rows[endpoint] = _stats(items, wall)
    rows["all"] = _stats(everything, wall)
    return rows


def _stats(items: list, wall: float) -> dict:
    latencies = np.array([latency for latency, _, _, _ in items]) * 1000 if items else np.zeros(0)
    settled = np.array([latency for latency, _, _, sent_at in items if sent_at >= SETTLE_S]) * 1000
    errors = [status for _, ok, status, _ in items if not ok]
    return {
        "requests": len(items),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "throughput_rps": round(len(items) / wall, 2) if wall else 0.0,
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
        "max_ms": round(float(latencies.max()), 1) if len(latencies) else None,
        # Without the start of the load (64 clients at once on a fresh server, cold caches).
        "p99_ms_settled": round(float(np.percentile(settled, 99)), 1) if len(settled) else None,
    }


def format_table(rows: dict, baseline: dict | None = None) -> str:
    """The per-endpoint table; with ``baseline`` (the same rows of the baseline server) also
    the ratios baseline / this of p50 and p99 latency (> 1: faster now) and this / baseline
    of throughput (> 1: more requests now)."""
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    header = f"{'endpoint':<12} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {f'p99>{SETTLE_S:.0f}s':>9}"
    if baseline:
        header += f" {'p50 x':>7} {'p99 x':>7} {'req/s x':>8}"
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        line = f"{name:<12} {r['requests']:>8} {r['errors']:>6} {r['throughput_rps']:>8.2f} {fmt(r['p50_ms']):>9} {fmt(r['p99_ms']):>9} {fmt(r['max_ms']):>9} {fmt(r.get('p99_ms_settled')):>9}"
        if baseline:
            ratio = ratios(baseline.get(name), r)
            line += "".join(f" {'-' if ratio[k] is None else f'{ratio[k]:.2f}':>{w}}" for k, w in (("p50", 7), ("p99", 7), ("throughput", 8)))
        lines.append(line)
    return "\n".join(lines)


def ratios(before: dict | None, after: dict) -> dict:
    """Speed-ups of ``after`` over ``before``: p50 and p99 latency (before / after) and
    throughput (after / before); None where a side has no number."""
    def div(a, b):
        return round(a / b, 2) if a and b else None

    before = before or {}
    return {
        "p50": div(before.get("p50_ms"), after["p50_ms"]),
        "p99": div(before.get("p99_ms"), after["p99_ms"]),
        "throughput": div(after["throughput_rps"], before.get("throughput_rps")),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoints-dir", type=Path, default=Path("checkpoints"))
    source.add_argument("--export-dir", type=Path, default=None)
    source.add_argument("--url", default=None, help="a server already running on this machine (127.0.0.1 / localhost only)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (bounded)")
    parser.add_argument("--max-requests", type=int, default=5000, help="stop after this many requests in all")
    parser.add_argument("--endpoints", nargs="+", choices=list(ENDPOINTS), default=list(ENDPOINTS))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--embedding-inputs", type=int, default=2, help="texts in each /v1/embeddings request (bulk work: up to 256)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    parser.add_argument("--torch-threads", type=int, default=0, help="passed to the server (0: its default)")
    parser.add_argument("--server-args", default="", help="more arguments for this tree's server, e.g. '--embedding-workers 2'")
    parser.add_argument("--baseline", default=None, metavar="REF",
                        help="first load the server of git revision REF (e.g. main) the same way, and report ratios")
    parser.add_argument("--rounds", type=int, default=None,
                        help="load rounds per server of duration/rounds seconds, alternating between the servers "
                        "(A B B A ...; default 2 with --baseline, else 1)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "api_load.json")
    return parser


class Server:
    """A server under test: started from the source tree ``code`` (or already running at
    ``url``), its endpoints (those whose models are trained), and its load rounds so far."""

    def __init__(self, args: argparse.Namespace, label: str, code: Path | None, extra: list[str]) -> None:
        self.label, self.extra, self.process = label, extra, None
        if code is None:
            self.url = args.url.rstrip("/")
        else:
            log_path = Path(tempfile.gettempdir()) / f"mark_api_load_server_{label.replace(' ', '_')}.log"
            self.process, self.url = start_server(args, log_path, code, extra)
            print(f"[{label}] server log: {log_path}")
        self.records: dict[str, list] = {}
        self.wall = self.server_cpu = self.client_cpu = 0.0
        self.load_average: list[float] = []

    def ready(self, wanted: list[str]) -> list[str]:
        startup = time.perf_counter()
        health = wait_ready(self.url, self.process)
        print(f"[{self.label}] server ready at {self.url} in {time.perf_counter() - startup:.1f}s; models: {health['models']}")
        trained = {name for name, state in health["models"].items() if state == "loaded"}
        return [e for e in wanted if ENDPOINTS[e][2] is None or set(ENDPOINTS[e][2].split("+")) <= trained]

    def load(self, args: argparse.Namespace, endpoints: list[str], duration: float) -> None:
        """One round of ``duration`` seconds; its records add to the earlier rounds'."""
        proc = psutil.Process(self.process.pid) if self.process is not None else None
        cpu, client_cpu, load_before = sum(proc.cpu_times()[:2]) if proc else 0.0, time.process_time(), os.getloadavg()[0]
        records, wall = asyncio.run(run_load(
            self.url, endpoints, args.clients, duration, args.max_requests, args.max_new_tokens, args.timeout, args.embedding_inputs,
        ))
        self.server_cpu += sum(proc.cpu_times()[:2]) - cpu if proc else 0.0
        self.client_cpu += time.process_time() - client_cpu
        self.wall += wall
        self.load_average += [round(load_before, 2), round(os.getloadavg()[0], 2)]
        for endpoint, items in records.items():
            self.records.setdefault(endpoint, []).extend(items)
        print(f"[{self.label}] round of {wall:.1f}s: {sum(map(len, records.values()))} requests, load average {load_before:.1f}")

    def result(self, endpoints: list[str], skipped: list[str]) -> dict:
        models = httpx.get(f"{self.url}/models", timeout=30).json()
        return {
            "label": self.label, "endpoints_run": endpoints, "skipped": skipped, "wall_s": round(self.wall, 2),
            "rows": summarise(self.records, self.wall), "server_args": self.extra, "generation_batching": models.get("generation"),
            "models": [{k: m.get(k) for k in ("name", "status", "source", "trained_at", "details")} for m in models.get("models", [])],
            "cpu_seconds": {"server": round(self.server_cpu, 2) if self.process else None, "client": round(self.client_cpu, 2)},
            "server_cores_used": round(self.server_cpu / self.wall, 2) if self.process and self.wall else None,
            "load_average": [min(self.load_average), max(self.load_average)],
        }

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def round_order(servers: int, rounds: int) -> list[int]:
    """Which server each round loads: 0 1 1 0 0 1 ... (ABBA), so a trend in the machine's
    load over the run weighs on both sides alike."""
    order = []
    for r in range(rounds):
        order += list(range(servers)) if r % 2 == 0 else list(reversed(range(servers)))
    return order


def report(run: dict, args: argparse.Namespace, baseline: dict | None = None) -> None:
    rows = run["rows"]
    print(f"\n[{run['label']}] {args.clients} clients, {run['wall_s']:.1f}s in {args.rounds} round(s), {rows['all']['requests']} requests, "
          f"max {args.max_new_tokens} new tokens per generation, {args.embedding_inputs} texts per /v1/embeddings\n")
    print(format_table(rows, baseline["rows"] if baseline else None))
    for name, row in rows.items():
        if row["errors"] and name != "all":
            print(f"{name} errors: {row['error_examples']}")
    print(f"generation batching: {run['generation_batching']}")
    cpu = run["cpu_seconds"]
    print(
        f"CPU seconds during the load: server {cpu['server']} ({run['server_cores_used']} cores), client {cpu['client']}; "
        f"machine load average {run['load_average'][0]:.1f} to {run['load_average'][1]:.1f} on {os.cpu_count()} cores"
    )


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.rounds = args.rounds or (2 if args.baseline else 1)
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1 or args.rounds < 1 or not 1 <= args.embedding_inputs <= 256:
        raise SystemExit("--clients, --duration, --rounds and --max-requests must be positive, --embedding-inputs 1 to 256")
    if args.url:
        host = urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--url must be on loopback (127.0.0.1), not {host}")
        if args.baseline:
            raise SystemExit("--baseline starts its own servers; it does not go with --url")
    servers: list[Server] = []
    folder = Path(tempfile.mkdtemp(prefix="mark_api_load_baseline_")) if args.baseline else None
    try:
        if args.baseline:
            servers.append(Server(args, f"baseline {args.baseline}", checkout(args.baseline, folder), []))
        servers.append(Server(args, "this tree", None if args.url else REPO_ROOT, shlex.split(args.server_args)))
        available = [server.ready(args.endpoints) for server in servers]
        endpoints = [e for e in args.endpoints if all(e in a for a in available)]  # the same load for both
        skipped = [e for e in args.endpoints if e not in endpoints]
        if skipped:
            print(f"skipped (model not trained): {', '.join(skipped)}")
        for index in round_order(len(servers), args.rounds):
            servers[index].load(args, endpoints, args.duration / args.rounds)
        results = [server.result(endpoints, skipped) for server in servers]
    finally:
        for server in servers:
            server.stop()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    baseline, current = (results[0], results[1]) if args.baseline else (None, results[0])
    if baseline:
        report(baseline, args)
    report(current, args, baseline)
    rows = current["rows"]
    result = {
        "config": {
            "clients": args.clients, "duration_s": args.duration, "max_requests": args.max_requests,
            "max_new_tokens": args.max_new_tokens, "embedding_inputs": args.embedding_inputs,
            "endpoints": current["endpoints_run"], "skipped": current["skipped"], "server_args": current["server_args"],
            "rounds": args.rounds,
            "source": args.url or str(args.export_dir or args.checkpoints_dir), "baseline": args.baseline,
        },
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "shared": "load average before -> after each run in runs[].load_average",
        },
        "wall_s": current["wall_s"],
        "endpoints": rows,
        "runs": [r for r in (baseline, current) if r is not None],
        "ratios_vs_baseline": {name: ratios(baseline["rows"].get(name), row) for name, row in rows.items()} if baseline else None,
        "goal": {
            "zero_errors": rows["all"]["errors"] == 0,
            "rag_search_p99_le_1s": rows.get("rag-search", {}).get("p99_ms") is not None and rows["rag-search"]["p99_ms"] <= 1000,
            "query_p99_le_3s": rows.get("query", {}).get("p99_ms") is not None and rows["query"]["p99_ms"] <= 3000,
        },
    }
    atomic_write_json(args.output, result)
    print(f"goal: {result['goal']}")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
