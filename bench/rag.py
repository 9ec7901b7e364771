"""RAG benchmark, in one run:

1. Indexing throughput: MARK's ``RagIndex.add_documents`` (tokenize, chunk, embed,
   normalise, FAISS add) vs. calling sentence-transformers ``encode`` directly on the same
   chunk texts, in documents per second. Goal: ratio >= 0.9 (the encoder is the limit).
2. Query latency of ``Retriever.search`` on that real index (search + per-document
   aggregation), with and without the query embedding, for the dense, bm25 and hybrid modes.
3. FAISS query latency p50/p99 (one query at a time) at 10k and 1M random unit vectors,
   exact ``IndexFlatIP`` vs ``IndexIVFFlat`` (as MARK builds and searches them), with
   IVF's recall@10 against exact search;
   and IVF's recall@10 on the real chunk embeddings of step 1.

    python bench/rag.py [--docs 40] [--sizes 10000 1000000] [--queries 200]

Writes ``bench/results/rag.json`` and ``bench/results/rag.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
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

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from src.core.checkpoint import atomic_write_json  # noqa: E402
from src.rag.beir import load_documents  # noqa: E402
from src.rag.config import RagIndexConfig, RagRetrievalConfig  # noqa: E402
from src.rag.encoder import Encoder  # noqa: E402
from src.rag.indexer import RagIndex, new_faiss_index, search_faiss  # noqa: E402
from src.rag.retriever import Retriever  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
DIM = 384
TOP_K = 10


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k ids that the approximate search found."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def sample_documents(path: Path, count: int):
    """Every n-th document, so the subset has the corpus's spread of lengths."""
    docs = load_documents(path)
    step = max(1, len(docs) // count)
    return docs[::step][:count], len(docs)


def bench_indexing(encoder: Encoder, docs, batch_size: int, repeats: int) -> tuple[dict, RagIndex]:
    chunk_size, overlap = 200, 32
    encoder.encode(["warm-up"] * 4)  # first-call set-up is not throughput
    mark_times, direct_times, index = [], [], None
    for _ in range(repeats):  # alternate the two, so load from other processes hits both alike
        index = RagIndex(encoder, RagIndexConfig(type="flat"), chunk_size, overlap, batch_size=batch_size)
        start = time.perf_counter()
        index.add_documents(docs)
        mark_times.append(time.perf_counter() - start)

        chunks = list(index.get_chunks(range(index.num_chunks)).values())
        texts = [chunk["text"] for chunk in chunks]
        start = time.perf_counter()
        encoder.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        direct_times.append(time.perf_counter() - start)
    mark_s, direct_s = min(mark_times), min(direct_times)
    result = {
        "documents": len(docs),
        "chunks": index.num_chunks,
        "tokens": int(sum(c["end_token"] - c["start_token"] for c in chunks)),
        "chunk_size": chunk_size,
        "chunk_overlap": overlap,
        "batch_size": batch_size,
        "repeats": repeats,
        "mark_seconds": round(mark_s, 3),
        "direct_encode_seconds": round(direct_s, 3),
        "mark_docs_per_s": round(len(docs) / mark_s, 3),
        "direct_encode_docs_per_s": round(len(docs) / direct_s, 3),
        "mark_chunks_per_s": round(index.num_chunks / mark_s, 2),
        "ratio": round(direct_s / mark_s, 3),
    }
    return result, index


def bench_end_to_end(index: RagIndex, queries: list[str]) -> dict:
    """Per-query latency of ``Retriever.search``: with the query embedding (what a caller
    waits for) and from a precomputed embedding (MARK's own retrieval cost)."""
    retriever = Retriever(index, RagRetrievalConfig())
    retriever.search(queries[0], mode="hybrid")  # builds the BM25 index once
    vectors = retriever.embed_queries(queries)
    out: dict = {"queries": len(queries), "chunks": index.num_chunks, "search_only": {}}
    for mode in ("dense", "bm25", "hybrid"):
        with_embedding, search_only = [], []
        for query, vector in zip(queries, vectors):
            start = time.perf_counter()
            retriever.search(query, top_k=5, mode=mode)
            with_embedding.append(time.perf_counter() - start)
            start = time.perf_counter()
            retriever.search(query, top_k=5, mode=mode, query_vector=vector)
            search_only.append(time.perf_counter() - start)
        out[mode] = percentiles_ms(with_embedding)
        out["search_only"][mode] = percentiles_ms(search_only)
    return out


def ivf_recall_on_real_embeddings(index: RagIndex, queries: np.ndarray, nprobes: list[int]) -> dict:
    vectors = index.chunk_vectors(range(index.num_chunks))
    nlist = max(1, int(round(math.sqrt(len(vectors)))))
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    _, truth = exact.search(queries, TOP_K)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = 0
    ivf.train(vectors)
    ivf.add(vectors)
    recalls = {}
    for nprobe in nprobes:
        ivf.nprobe = min(nprobe, nlist)
        recalls[f"nprobe={nprobe}"] = round(recall_at_k(ivf.search(queries, TOP_K)[1], truth), 4)
    return {"vectors": len(vectors), "nlist": nlist, "queries": len(queries), "recall@10": recalls}


def random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def single_query_latency(index: faiss.Index, queries: np.ndarray) -> dict:
    """p50/p99 of one query at a time, through MARK's search path (one OpenMP thread per query)."""
    index.search(queries[:2], TOP_K)  # warm-up
    times = []
    for q in queries:
        start = time.perf_counter()
        search_faiss(index, q[None, :], TOP_K)
        times.append(time.perf_counter() - start)
    return percentiles_ms(times)


def bench_faiss_random(n: int, num_queries: int, nprobes: list[int], seed: int = 0) -> dict:
    """Exact vs IVF on ``n`` random unit vectors, added in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    nlist = max(1, int(round(math.sqrt(n))))
    train_size = min(n, 64 * nlist)  # k-means sample: enough for stable cells, bounded time
    queries = random_unit(rng, num_queries)
    train = random_unit(rng, train_size)

    # The indexes MARK builds for index.type flat / ivf.
    start = time.perf_counter()
    ivf = new_faiss_index(DIM, RagIndexConfig(type="ivf", ivf_nlist=nlist))
    ivf.cp.seed = seed
    ivf.train(train)
    train_s = time.perf_counter() - start
    flat = new_faiss_index(DIM, RagIndexConfig(type="flat"))
    block, added, add_flat_s, add_ivf_s = 100_000, 0, 0.0, 0.0
    first = True
    while added < n:
        # The training sample is the first block, so the database is n vectors in all.
        x = train[: min(block, n)] if first else random_unit(rng, min(block, n - added))
        if first and len(x) < min(block, n):
            x = np.concatenate([x, random_unit(rng, min(block, n) - len(x))])
        first = False
        t = time.perf_counter()
        flat.add(x)
        add_flat_s += time.perf_counter() - t
        t = time.perf_counter()
        ivf.add(x)
        add_ivf_s += time.perf_counter() - t
        added += len(x)
        del x

    _, truth = flat.search(queries, TOP_K)
    result = {
        "vectors": n,
        "dim": DIM,
        "queries": num_queries,
        "flat": {"add_seconds": round(add_flat_s, 2), **single_query_latency(flat, queries)},
        "ivf": {"nlist": nlist, "train_vectors": train_size, "train_seconds": round(train_s, 2), "add_seconds": round(add_ivf_s, 2), "by_nprobe": {}},
    }
    for nprobe in nprobes:
        ivf.nprobe = min(nprobe, nlist)
        found = ivf.search(queries, TOP_K)[1]
        result["ivf"]["by_nprobe"][str(nprobe)] = {
            "recall@10": round(recall_at_k(found, truth), 4),
            **single_query_latency(ivf, queries),
        }
    del flat, ivf
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    idx = results["indexing"]
    axes[0].bar(["MARK index", "ST encode"], [idx["mark_docs_per_s"], idx["direct_encode_docs_per_s"]], color=["tab:blue", "tab:gray"])
    axes[0].set_ylabel("documents / s")
    axes[0].set_title(f"indexing {idx['documents']} docs ({idx['chunks']} chunks): ratio {idx['ratio']:.2f}")

    labels, p50, p99 = [], [], []
    for size in results["faiss_random"]:
        n = f"{size['vectors'] // 1000}k" if size["vectors"] < 1_000_000 else f"{size['vectors'] / 1e6:g}M"
        labels.append(f"{n} flat")
        p50.append(size["flat"]["p50_ms"])
        p99.append(size["flat"]["p99_ms"])
        for nprobe, r in size["ivf"]["by_nprobe"].items():
            labels.append(f"{n} ivf{nprobe}\nR@10 {r['recall@10']:.2f}")
            p50.append(r["p50_ms"])
            p99.append(r["p99_ms"])
    x = np.arange(len(labels))
    axes[1].bar(x - 0.2, p50, 0.4, label="p50")
    axes[1].bar(x + 0.2, p99, 0.4, label="p99")
    axes[1].set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms per query (log)")
    axes[1].set_title("FAISS top-10, random unit vectors, 1 query at a time")
    axes[1].legend()

    e2e = results["end_to_end"]
    modes = ["dense", "bm25", "hybrid"]
    x = np.arange(len(modes))
    axes[2].bar(x - 0.3, [e2e[m]["p50_ms"] for m in modes], 0.2, label="p50 with embedding")
    axes[2].bar(x - 0.1, [e2e[m]["p99_ms"] for m in modes], 0.2, label="p99 with embedding")
    axes[2].bar(x + 0.1, [e2e["search_only"][m]["p50_ms"] for m in modes], 0.2, label="p50 from vector")
    axes[2].bar(x + 0.3, [e2e["search_only"][m]["p99_ms"] for m in modes], 0.2, label="p99 from vector")
    axes[2].set_xticks(x, modes)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("ms per query (log)")
    axes[2].set_title(f"MARK Retriever.search, top 5 ({e2e['chunks']} chunks)")
    axes[2].legend(fontsize=7)
    fig.suptitle(results["machine"]["summary"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(results: dict) -> None:
    idx = results["indexing"]
    print(f"\nRAG benchmark on {results['machine']['summary']}")
    print(f"\nindexing {idx['documents']} documents -> {idx['chunks']} chunks ({idx['tokens']} word-pieces), best of {idx['repeats']}")
    print(f"  MARK RagIndex.add_documents   {idx['mark_docs_per_s']:8.2f} docs/s  ({idx['mark_seconds']:.1f} s, {idx['mark_chunks_per_s']:.1f} chunks/s)")
    print(f"  sentence-transformers encode  {idx['direct_encode_docs_per_s']:8.2f} docs/s  ({idx['direct_encode_seconds']:.1f} s)")
    print(f"  ratio MARK / encode           {idx['ratio']:8.3f}  (goal >= 0.9)")
    e2e = results["end_to_end"]
    print(f"\nMARK Retriever.search, top 5 documents ({e2e['chunks']} chunks, {e2e['queries']} queries): ms p50 / p99")
    print(f"  {'mode':<7} {'with query embedding':>22} {'from a query vector':>22}")
    for mode in ("dense", "bm25", "hybrid"):
        only = e2e["search_only"][mode]
        print(f"  {mode:<7} {e2e[mode]['p50_ms']:10.2f} / {e2e[mode]['p99_ms']:9.2f} {only['p50_ms']:10.2f} / {only['p99_ms']:9.2f}")
    real = results["ivf_real_embeddings"]
    print(f"\nIVF recall@10 vs exact on the real chunk embeddings ({real['vectors']} vectors, nlist {real['nlist']}): {real['recall@10']}")
    print("\nFAISS top-10 on random unit vectors (dim 384), one query at a time")
    print(f"  {'vectors':>9}  {'index':<14} {'p50 ms':>9} {'p99 ms':>9} {'recall@10':>10}")
    for size in results["faiss_random"]:
        print(f"  {size['vectors']:>9}  {'flat (exact)':<14} {size['flat']['p50_ms']:>9.3f} {size['flat']['p99_ms']:>9.3f} {1.0:>10.3f}")
        for nprobe, r in size["ivf"]["by_nprobe"].items():
            name = f"ivf{size['ivf']['nlist']} np{nprobe}"
            print(f"  {size['vectors']:>9}  {name:<14} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['recall@10']:>10.3f}")


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "summary": f"{cpu}, {cores} cores, torch {torch.__version__}, faiss {faiss.__version__}",
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents-file", type=Path, default=REPO_ROOT / "data" / "documents.jsonl",
                        help="corpus to index (made with src.data.prepare when missing)")
    parser.add_argument("--docs", type=int, default=40, help="documents indexed for the throughput test")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "rag.json")
    args = parser.parse_args(argv)

    documents_file = args.documents_file
    if not documents_file.is_file():
        from src.data.prepare import prepare_sample_data

        documents_file = Path(tempfile.mkdtemp(prefix="mark_bench_rag_")) / "documents.jsonl"
        prepare_sample_data(documents_file.parent)
    docs, corpus_size = sample_documents(documents_file, args.docs)
    encoder = Encoder("sentence-transformers/all-MiniLM-L6-v2", args.device)

    results: dict = {"machine": machine_info(), "documents_file": str(documents_file), "corpus_documents": corpus_size}
    print(f"indexing {len(docs)} of {corpus_size} documents ...", flush=True)
    results["indexing"], index = bench_indexing(encoder, docs, args.batch_size, args.repeats)

    eval_file = documents_file.parent / "rag_eval.jsonl"
    if eval_file.is_file():
        queries = [json.loads(line)["query"] for line in eval_file.read_text().splitlines() if line.strip()][: args.queries]
    else:
        queries = [chunk["text"][:200] for chunk in index.get_chunks(range(args.queries)).values()]
    print(f"end-to-end search latency over {len(queries)} queries ...", flush=True)
    results["end_to_end"] = bench_end_to_end(index, queries)
    results["ivf_real_embeddings"] = ivf_recall_on_real_embeddings(index, encoder.encode(queries), args.nprobes)

    results["faiss_random"] = []
    for n in args.sizes:
        print(f"FAISS on {n} random vectors ...", flush=True)
        start = time.perf_counter()
        size_result = bench_faiss_random(n, args.queries, args.nprobes)
        size_result["total_seconds"] = round(time.perf_counter() - start, 1)
        results["faiss_random"].append(size_result)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, results)
    plot(results, args.output.with_suffix(".png"))
    print_table(results)
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
