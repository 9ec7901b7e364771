"""RAG store benchmark: the embedded store (SQLite + FTS5 + FAISS segment) against the
previous store (one metadata.json + in-memory bm25s, ``main``'s ``RagIndex``), in one run.

Random unit vectors stand in for the encoder (to isolate the store), documents of ~120 words
drawn from a Zipf vocabulary, one chunk each. For every size and store, a fresh process:

* builds the index (new: committed in batches of 10k chunks, then one compaction; old:
  ``save``), timed;
* a second fresh process opens it (timed), runs keyword (BM25) and hybrid queries (p50, and
  the first keyword query, which builds the old store's BM25), adds one document and commits
  (new) or saves (old), and reports its peak RSS; the folder's size on disk is summed.

    python bench/rag_store.py [--sizes 30000 150000 1000000] [--old-sizes 30000 150000] [--queries 50]

Writes ``bench/results/rag_store.json`` and prints a table. The old store is ``git show
main:src`` extracted to a temporary folder (``--old-ref``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DIM = 384
WORDS_PER_DOC = 120
VOCAB = 50_000
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


# ------------------------------------------------------------------ shared by both workers
def corpus_words(seed: int = 0):
    """A Zipf(1.1) distribution over ``VOCAB`` pseudo-words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(3, 10)))) for _ in range(VOCAB)]
    p = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    return vocab, p / p.sum()


def doc_texts(start: int, count: int, vocab, p, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed + start)
    words = rng.choice(len(vocab), size=(count, WORDS_PER_DOC), p=p)
    return [" ".join(vocab[w] for w in row) for row in words]


def unit_vectors(n: int, seed: int):
    import numpy as np

    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def queries(vocab, n: int, seed: int = 7) -> list[str]:
    """Three words of mid frequency (Zipf ranks 50-5000), as a person's keywords would be."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(vocab[int(r)] for r in rng.integers(50, 5000, size=3)) for _ in range(n)]


class RandomEncoder:
    """The encoder's interface with random unit vectors (the real tokenizer, for chunking)."""

    def __init__(self, seed: int = 1) -> None:
        from transformers import AutoTokenizer

        from src.core.hub import resolve_pretrained

        self.name = MODEL
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(MODEL))
        self.max_seq_length, self.dim, self.num_special_tokens, self.device = 256, DIM, 2, "cpu"
        self.seed = seed

    def encode(self, texts, batch_size: int = 32, show_progress: bool = False):
        self.seed += 1
        return unit_vectors(len(texts), self.seed)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def p50_ms(times: list[float]) -> float:
    import numpy as np

    return round(float(np.percentile(np.asarray(times) * 1000, 50)), 2)


# ------------------------------------------------------------------ workers (run in fresh processes)
def build_new(folder: Path, n: int, index_type: str = "flat") -> dict:
    from tqdm.auto import tqdm

    from src.rag.store import ChunkRecord, ChunkStore, DocumentRecord

    vocab, p = corpus_words()
    settings = {
        "embedding_model": MODEL, "embedding_dim": DIM, "max_seq_length": 256, "seed": 42,
        "chunking": {"unit": "word-pieces", "chunk_size": 200, "chunk_overlap": 32},
        "index": {"type": index_type, "pq_m": None, "refine_k_factor": 20},
    }
    start = time.perf_counter()
    store = ChunkStore.create(folder, settings)
    batch = 10_000
    for first in tqdm(range(0, n, batch), desc=f"build new {n}", unit="batch", mininterval=5):
        count = min(batch, n - first)
        texts = doc_texts(first, count, vocab, p, seed=3)
        docs = [DocumentRecord(f"doc{first + i}", {"source": f"doc{first + i}.txt"}, f"h{first + i}", len(t), [ChunkRecord(0, t, 0, len(t))])
                for i, t in enumerate(texts)]
        store.add(docs, unit_vectors(count, first))
    add_s = time.perf_counter() - start
    store.compact()
    store.close()
    return {"build_s": round(time.perf_counter() - start, 2), "commit_s": round(add_s, 2), "build_peak_rss_mb": peak_rss_mb()}


def build_old(folder: Path, n: int) -> dict:
    import faiss

    from src.rag.config import RagIndexConfig
    from src.rag.indexer import RagIndex  # main's

    vocab, p = corpus_words()
    index = RagIndex(RandomEncoder(), RagIndexConfig(type="flat"), 200, 32)
    start = time.perf_counter()
    for first in range(0, n, 10_000):
        count = min(10_000, n - first)
        for i, text in enumerate(doc_texts(first, count, vocab, p, seed=3)):
            doc_id = f"doc{first + i}"
            index.documents[doc_id] = {"sha256": f"h{first + i}", "num_chars": len(text), "num_chunks": 1, "metadata": {"source": f"{doc_id}.txt"}}
            index.chunks.append({"doc_id": doc_id, "chunk_index": 0, "text": text, "start_char": 0, "end_char": len(text), "start_token": 0, "end_token": 0})
        index.faiss_index.add(unit_vectors(count, first))
    index._rebuild_doc_chunk_ids()
    fill_s = time.perf_counter() - start
    start = time.perf_counter()
    index.save(folder)
    assert isinstance(index.faiss_index, faiss.IndexFlatIP)
    return {"save_s": round(time.perf_counter() - start, 2), "fill_s": round(fill_s, 2), "build_peak_rss_mb": peak_rss_mb()}


def measure(folder: Path, store: str, num_queries: int) -> dict:
    from src.rag.indexer import RagIndex
    from src.rag.retriever import Retriever

    vocab, _ = corpus_words()
    qs = queries(vocab, num_queries)
    encoder = RandomEncoder()
    start = time.perf_counter()
    index = RagIndex.load(folder, encoder=encoder, writable=False) if store == "new" else RagIndex.load(folder, encoder=encoder)
    open_s = time.perf_counter() - start
    retriever = Retriever(index)
    qv = unit_vectors(num_queries, 99)
    start = time.perf_counter()
    first = retriever.search(qs[0], top_k=5, mode="bm25")
    first_keyword_s = time.perf_counter() - start
    keyword, hybrid, hits = [], [], 0
    for q, v in zip(qs, qv):
        t = time.perf_counter()
        hits += len(retriever.search(q, top_k=5, mode="bm25"))
        keyword.append(time.perf_counter() - t)
        t = time.perf_counter()
        retriever.search(q, top_k=5, mode="hybrid", query_vector=v)
        hybrid.append(time.perf_counter() - t)
    query_rss = peak_rss_mb()
    agreement = None
    if store == "new" and index.store.settings["index"]["type"] != "flat":  # against an exact scan of the same vectors
        import numpy as np

        from src.rag.store import _stored_vectors

        labels, stored = _stored_vectors(index.store.base)
        shares = []
        for v in qv:
            exact = labels[np.argpartition(-(stored @ v), 50)[:50]]
            shares.append(len(set(exact.tolist()) & set(index.store.search_vectors(v[None], 50)[1][0].tolist())) / 50)
        agreement = round(float(np.mean(shares)), 4)
    num_chunks = index.num_chunks
    text = " ".join(vocab[i] for i in range(100, 220))
    if store == "new":
        index.close()
        start = time.perf_counter()
        writer = RagIndex.load(folder, encoder=encoder, writable=True)
        reopen_writable_s = time.perf_counter() - start
        start = time.perf_counter()
        writer.add_documents([{"id": "added-one", "text": text, "metadata": {"source": "added-one.txt"}}])
        add_s = time.perf_counter() - start
        writer.close()
    else:
        reopen_writable_s = 0.0
        start = time.perf_counter()
        index.add_documents([{"id": "added-one", "text": text}])
        index.save(folder)
        add_s = time.perf_counter() - start
    return {
        "open_s": round(open_s, 3), "first_keyword_query_s": round(first_keyword_s, 3),
        "keyword_p50_ms": p50_ms(keyword), "hybrid_p50_ms": p50_ms(hybrid), "keyword_hits_per_query": round(hits / num_queries, 2),
        "dense_top50_agreement": agreement,
        "add_one_doc_s": round(add_s, 3), "open_writable_s": round(reopen_writable_s, 3),
        "query_peak_rss_mb": query_rss, "peak_rss_mb": peak_rss_mb(), "disk_mb": folder_mb(folder),
        "vectors_mb": round(num_chunks * DIM * 4 / 2**20, 1), "first_hits": len(first),
    }


# ------------------------------------------------------------------ driver
def run_worker(role: str, store: str, folder: Path, n: int, num_queries: int, old_src: Path | None, index_type: str = "flat") -> dict:
    env = {**os.environ, "PYTHONPATH": str(old_src if store == "old" else REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--store", store, "--folder", str(folder), "--n", str(n),
           "--queries", str(num_queries), "--index-type", index_type]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{role} {store} {n}: failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def extract_old_source(ref: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mark-old-store-"))
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def print_table(rows: list[dict]) -> None:
    cols = [("store", "store"), ("index", "index"), ("chunks", "chunks"), ("build_s", "build s"), ("open_s", "open s"), ("first_keyword_query_s", "1st kw s"),
            ("keyword_p50_ms", "kw p50 ms"), ("hybrid_p50_ms", "hyb p50 ms"), ("add_one_doc_s", "add 1 doc s"),
            ("peak_rss_mb", "peak RSS MB"), ("vectors_mb", "vectors MB"), ("disk_mb", "disk MB")]
    print(" | ".join(h for _, h in cols))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k, _ in cols))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30_000, 150_000, 1_000_000])
    parser.add_argument("--old-sizes", type=int, nargs="*", default=[30_000, 150_000])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--old-ref", default="eaedfa1", help="the commit of the previous store (metadata.json + bm25s)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the indexes are built (default: a temp folder, removed)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "rag_store.json")
    parser.add_argument("--worker", choices=["build", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--store", choices=["new", "old"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--index-type", default="flat", help=argparse.SUPPRESS)
    parser.add_argument("--index-types", nargs="+", default=["flat"], choices=["flat", "pq-refine"],
                        help="FAISS index types of the new store (pq-refine: exhaustive 4-bit PQ scan, exact re-scoring)")
    args = parser.parse_args(argv)

    if args.worker:
        sys.path.insert(0, os.environ["PYTHONPATH"])
        if args.worker == "build":
            result = build_new(args.folder, args.n, args.index_type) if args.store == "new" else build_old(args.folder, args.n)
        else:
            result = measure(args.folder, args.store, args.queries)
        print(json.dumps(result))
        return result

    import shutil

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mark-rag-store-bench-"))
    old_src = extract_old_source(args.old_ref) if args.old_sizes else None
    rows = []
    try:
        for n in sorted(set(args.sizes) | set(args.old_sizes)):
            for store, index_type in [("old", "flat")] + [("new", t) for t in args.index_types]:
                if (store == "new" and n not in args.sizes) or (store == "old" and n not in args.old_sizes):
                    continue
                folder = work / f"{store}_{n}_{index_type}"
                shutil.rmtree(folder, ignore_errors=True)
                print(f"{store} store ({index_type}), {n} chunks: building ...", flush=True)
                built = run_worker("build", store, folder, n, args.queries, old_src, index_type)
                measured = run_worker("measure", store, folder, n, args.queries, old_src, index_type)
                row = {"store": store, "index": index_type, "chunks": n, "build_s": built.get("build_s", built.get("save_s")), **built, **measured}
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        if old_src is not None:
            shutil.rmtree(old_src, ignore_errors=True)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg(), "note": "2-core box shared with other sessions: timings are noisy"},
        "setup": {"dim": DIM, "words_per_doc": WORDS_PER_DOC, "vocab": VOCAB, "zipf": 1.1, "queries": args.queries,
                  "query": "3 words of Zipf rank 50-5000", "hybrid": "RRF of dense (the row's index) and BM25, 50 candidates each",
                  "dense_agreement": "share of the dense top-50 equal to an exact flat scan's (pq-refine rows)"},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    return result


if __name__ == "__main__":
    main()
