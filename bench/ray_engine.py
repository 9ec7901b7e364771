"""Ingestion engines on the same files and chunks, in one run:

1. raw: ``SentenceTransformer.encode`` on the chunk texts (batch 32), the baseline;
2. local engine: ``read_source_file`` + ``chunk_document`` + ``Encoder.encode`` in this process;
3. Ray engine: the same steps on a local Ray cluster (``process_sources_with_ray``: a
   reader/chunker actor and an actor pool of encoders), timed from a started cluster
   (the cluster's start-up is reported apart).

The corpus: the sample documents (``src.data.prepare``) written as Markdown files, whose
headings the chunker follows. Goals: local >= 0.9x raw, Ray >= 0.8x local (chunks/s).

Every Ray run starts its own actors (Ray Data builds an actor pool per dataset execution:
each actor imports torch and transformers and loads the encoder), a fixed cost that a small
corpus does not hide. So the engines also run on a second, larger corpus (``--more-docs``),
and the *marginal* throughput, (chunks2 - chunks1) / (seconds2 - seconds1), is the rate at
which each engine ingests once it runs, what decides a large ingest; the fixed cost is
reported beside it.

    python bench/ray_engine.py [--docs 60] [--more-docs 150] [--repeats 2] [--num-cpus 2]

Writes ``bench/results/ray_engine.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from src.core.checkpoint import atomic_write_json  # noqa: E402
from src.data.files import iter_source_files  # noqa: E402
from src.data.prepare import prepare_sample_data  # noqa: E402
from src.rag.encoder import Encoder  # noqa: E402
from src.rag.ray_engine import connect, process_sources_with_ray, read_and_chunk  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CHUNK_SIZE, CHUNK_OVERLAP, BATCH = 200, 32, 32


def build_corpus(folder: Path, num_docs: int, name: str = "kb") -> None:
    data = folder / "data"
    if not (data / "documents.jsonl").is_file():
        prepare_sample_data(data)
    docs = [json.loads(line) for line in (data / "documents.jsonl").read_text().splitlines() if line.strip()]
    (folder / name).mkdir()
    for doc in sorted(docs, key=lambda d: d["id"])[:num_docs]:
        (folder / name / f"{doc['id']}.md").write_text(doc["text"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--more-docs", type=int, default=150, help="the second corpus, for the marginal throughput (0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per engine (the best is kept; local's first counts)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        build_corpus(Path(tmp), args.docs)
        sources = list(iter_source_files(Path(tmp) / "kb"))
        encoder = Encoder(MODEL, "cpu")

        def local(sources=sources):
            chunks = [c for s in sources for cs in read_and_chunk(s, encoder.tokenizer, CHUNK_SIZE, CHUNK_OVERLAP)[1] for c in cs]
            return chunks, encoder.encode([c.text for c in chunks], BATCH)

        start = time.perf_counter()
        chunks, local_vectors = local()
        local_first = time.perf_counter() - start
        texts = [c.text for c in chunks]
        print(f"{len(sources)} files, {len(texts)} chunks; local engine {local_first:.1f} s", flush=True)

        def raw():
            return encoder.model.encode(texts, batch_size=BATCH, convert_to_numpy=True, normalize_embeddings=True)

        def ray_engine(sources=sources):
            results = list(process_sources_with_ray(sources, MODEL, CHUNK_SIZE, CHUNK_OVERLAP, batch_size=BATCH))
            return np.concatenate([r.vectors for r in results])

        def timed(fn):
            start = time.perf_counter()
            out = fn()
            return time.perf_counter() - start, out

        def best_of(name, fn, first=None):
            times, out = ([first] if first is not None else []), None
            while len(times) < args.repeats:
                start = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - start)
                print(f"  {name}: {times[-1]:.1f} s", flush=True)
            return min(times), out

        timings = {"raw encode": best_of("raw encode", raw)[0], "local engine": best_of("local engine", local, local_first)[0]}
        start = time.perf_counter()
        connect(num_cpus=args.num_cpus)
        startup = time.perf_counter() - start
        import ray

        try:
            start = time.perf_counter()
            ray_engine()  # warm-up: the first run also starts Ray Data's actors (models load)
            warmup = time.perf_counter() - start
            print(f"  ray engine, first run (actors start): {warmup:.1f} s", flush=True)
            timings["ray engine"], ray_vectors = best_of("ray engine", ray_engine)
            marginal = None
            if args.more_docs > args.docs:
                build_corpus(Path(tmp), args.more_docs, "kb_more")
                more = list(iter_source_files(Path(tmp) / "kb_more"))
                local_more, (more_chunks, _) = timed(lambda: local(more))
                print(f"  local engine, {len(more)} files / {len(more_chunks)} chunks: {local_more:.1f} s", flush=True)
                ray_more, _ = timed(lambda: ray_engine(more))
                print(f"  ray engine, {len(more)} files: {ray_more:.1f} s", flush=True)
                extra = len(more_chunks) - len(texts)
                rates = {"local engine": extra / (local_more - timings["local engine"]), "ray engine": extra / (ray_more - timings["ray engine"])}
                marginal = {
                    "files": len(more), "chunks": len(more_chunks),
                    "seconds": {"local engine": round(local_more, 3), "ray engine": round(ray_more, 3)},
                    "chunks_per_s": {k: round(v, 2) for k, v in rates.items()},
                    "ray_vs_local": round(rates["ray engine"] / rates["local engine"], 3),
                    # seconds - chunks / marginal rate: what a run costs beside its chunks
                    "fixed_s": {k: round(timings[k] - len(texts) / v, 2) for k, v in rates.items()},
                }
        finally:
            ray.shutdown()

    n = len(texts)
    rows = {name: {"seconds": round(t, 3), "chunks_per_s": round(n / t, 2)} for name, t in timings.items()}
    ratios = {
        "local_vs_raw": round(timings["raw encode"] / timings["local engine"], 3),
        "ray_vs_local": round(timings["local engine"] / timings["ray engine"], 3),
    }
    result = {
        "files": len(sources),
        "chunks": n,
        "engines": rows,
        "ratios": ratios,
        "goals": {"local_vs_raw": 0.9, "ray_vs_local": 0.8},
        "ray_startup_s": round(startup, 2),
        "ray_first_run_s": round(warmup, 2),
        "marginal": marginal,
        "max_abs_vector_diff_ray_vs_local": float(np.abs(ray_vectors - local_vectors).max()),
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus, "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
        "note": "shared box: other jobs ran at the same time; ratios come from the same run",
    }
    print(f"{len(sources)} files, {n} chunks; Ray cluster start-up {startup:.1f} s (not in the timings)")
    print(f"{'engine':<14}{'seconds':>10}{'chunks/s':>10}")
    for name, row in rows.items():
        print(f"{name:<14}{row['seconds']:>10.2f}{row['chunks_per_s']:>10.1f}")
    print(f"local / raw = {ratios['local_vs_raw']:.2f} (goal >= 0.9); ray / local = {ratios['ray_vs_local']:.2f} (goal >= 0.8)")
    if marginal:
        rates, fixed = marginal["chunks_per_s"], marginal["fixed_s"]
        print(f"marginal ({n} -> {marginal['chunks']} chunks): local {rates['local engine']:.1f} chunks/s (fixed {fixed['local engine']:.1f} s), "
              f"ray {rates['ray engine']:.1f} chunks/s (fixed {fixed['ray engine']:.1f} s); ray / local = {marginal['ray_vs_local']:.2f}")
    out = REPO_ROOT / "bench" / "results" / "ray_engine.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
