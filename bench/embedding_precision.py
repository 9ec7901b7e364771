"""Document embedding in bf16 against fp32: the speed and the vectors behind ``model.embedding_precision``.

    python bench/embedding_precision.py [--documents data/documents.jsonl] [--limit N] [--chars 1500]
        [--output bench/results/embedding_precision.json]

Embeds the sample documents (the first ``--limit``; default all) (cut to ``--chars`` characters, batch 32, 2 threads) with the RAG
encoder (:class:`src.rag.encoder.Encoder`, all-MiniLM-L6-v2 offline) as the index does (``documents=True``), once in
fp32 (the baseline) and once in bf16, each after one warm-up pass, in the same process. Prints a table and writes the
JSON: seconds, documents/s, the speed-up, and the cosine of each document's bf16 vector to its fp32 vector (min, mean).
bf16 is a speed-up only on a CPU that computes it natively (``native bf16`` in the machine line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.core.runtime import machine_summary  # noqa: E402
from src.data.readers import read_documents  # noqa: E402
from src.rag.encoder import Encoder  # noqa: E402


def timed(encoder: Encoder, texts: list[str]) -> tuple[np.ndarray, float]:
    encoder.encode(texts[:64], batch_size=32, documents=True)  # warm-up
    start = time.perf_counter()
    vectors = encoder.encode(texts, batch_size=32, documents=True)
    return vectors, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=Path, default=Path("data/documents.jsonl"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--chars", type=int, default=1500)
    parser.add_argument("--output", type=Path, default=Path("bench/results/embedding_precision.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    texts = [d.text[: args.chars] for d in read_documents(args.documents)[: args.limit]]
    fp32 = Encoder("minilm-local", device="cpu", precision="fp32")
    base, base_s = timed(fp32, texts)
    bf16, bf16_s = timed(fp32.with_precision("bf16"), texts)
    cosine = (base * bf16).sum(axis=1)
    rows = {"fp32": {"seconds": round(base_s, 2), "docs_per_s": round(len(texts) / base_s, 1)},
            "bf16": {"seconds": round(bf16_s, 2), "docs_per_s": round(len(texts) / bf16_s, 1)}}
    print(f"{'precision':<10}{'seconds':>9}{'docs/s':>9}")
    for name, row in rows.items():
        print(f"{name:<10}{row['seconds']:>9.2f}{row['docs_per_s']:>9.1f}")
    print(f"bf16 speed-up {base_s / bf16_s:.2f}x; cosine to fp32: min {cosine.min():.6f}, mean {cosine.mean():.6f} ({len(texts)} documents)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "documents": len(texts), "chars": args.chars, "batch_size": 32, "threads": 2, "machine": machine_summary(),
        "results": rows, "speedup": round(base_s / bf16_s, 2),
        "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
    }, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
