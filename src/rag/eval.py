"""Retrieval quality: recall@k, precision@k, hit rate@k, MRR and nDCG@k.

Definitions (per query, then averaged over queries; ``rel(d)`` is the relevance grade,
1 for every listed document in MARK's JSONL, the qrels score in BEIR):

* ``recall@k``    = relevant documents in the top k / relevant documents
* ``precision@k`` = relevant documents in the top k / k
* ``hit_rate@k``  = 1 if any relevant document is in the top k, else 0
* ``mrr@k``       = 1 / rank of the first relevant document in the top k (0 if none);
  ``mrr`` is ``mrr@max(k)``
* ``ndcg@k``      = DCG@k / ideal DCG@k, with DCG@k = sum over ranks i <= k of
  rel(d_i) / log2(i + 1) (linear gain, as ``pytrec_eval`` / BEIR)

Eval data: MARK's JSONL (``{query, relevant_docs}``) or a BEIR folder
(``queries.jsonl`` + ``qrels/<split>.tsv``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from src.core.errors import ConfigError, DataError
from src.core.logging import get_logger
from src.data.readers import read_rag_eval
from src.rag.beir import read_beir_qrels, read_beir_queries
from src.rag.config import RagConfig
from src.rag.retriever import Retriever

log = get_logger("rag")
METRIC_NAMES = ("recall", "precision", "hit_rate", "mrr", "ndcg")


@dataclass(frozen=True)
class EvalQuery:
    """A query and its relevant documents with their grades (``{doc_id: grade > 0}``)."""

    query_id: str
    query: str
    relevance: dict[str, int]


def read_eval_queries(path: str | Path, split: str = "test") -> list[EvalQuery]:
    """Eval queries from MARK's JSONL file or a BEIR folder (``split`` picks the qrels file).

    BEIR qrels with grade 0 (judged not relevant) are dropped, and so are queries left
    with no relevant document, as BEIR does.
    """
    path = Path(path)
    if path.is_dir():
        queries = read_beir_queries(path / "queries.jsonl")
        qrels = read_beir_qrels(path / "qrels" / f"{split}.tsv")
        missing = [qid for qid in qrels if qid not in queries]
        if missing:
            raise DataError(f"{path}: qrels/{split}.tsv names queries not in queries.jsonl: {', '.join(missing[:5])}")
        out = []
        for qid, judged in qrels.items():
            relevance = {doc_id: grade for doc_id, grade in judged.items() if grade > 0}
            if relevance:
                out.append(EvalQuery(qid, queries[qid], relevance))
        if not out:
            raise DataError(f"{path}: qrels/{split}.tsv has no relevant (score > 0) pairs")
        return out
    if not path.is_file():
        raise DataError(f"{path}: eval file not found (a JSONL file {{query, relevant_docs}} or a BEIR folder)")
    return [
        EvalQuery(str(i), ex.query, {doc_id: 1 for doc_id in ex.relevant_docs})
        for i, ex in enumerate(read_rag_eval(path))
    ]


def split_eval_queries(queries: Sequence[EvalQuery], val_fraction: float, seed: int) -> tuple[list[EvalQuery], list[EvalQuery]]:
    """``(val, test)``: ``round(val_fraction * n)`` queries drawn for val by a seeded hash of
    each query (the same split for the same queries and seed, whatever their order), the rest
    test, both in file order."""
    import hashlib

    def key(q: EvalQuery) -> str:
        return hashlib.sha256(f"{seed}\t{q.query_id}\t{q.query}".encode("utf-8")).hexdigest()

    chosen = {id(q) for q in sorted(queries, key=key)[: round(val_fraction * len(queries))]}
    return [q for q in queries if id(q) in chosen], [q for q in queries if id(q) not in chosen]


def retrieval_metrics(ranked_doc_ids: Sequence[str], relevance: dict[str, int], top_k_values: Sequence[int]) -> dict[str, float]:
    """The metrics of one query's ranking (best first) against ``{doc_id: grade}``."""
    relevant = {d for d, g in relevance.items() if g > 0}
    if not relevant:
        raise ValueError("a query needs at least one relevant document")
    ideal = sorted((g for g in relevance.values() if g > 0), reverse=True)
    first_hit = next((i for i, d in enumerate(ranked_doc_ids, start=1) if d in relevant), None)
    metrics: dict[str, float] = {}
    for k in top_k_values:
        top = list(ranked_doc_ids[:k])
        hits = sum(1 for d in top if d in relevant)
        dcg = sum(relevance.get(d, 0) / math.log2(i + 1) for i, d in enumerate(top, start=1))
        idcg = sum(g / math.log2(i + 1) for i, g in enumerate(ideal[:k], start=1))
        metrics[f"recall@{k}"] = hits / len(relevant)
        metrics[f"precision@{k}"] = hits / k
        metrics[f"hit_rate@{k}"] = float(hits > 0)
        metrics[f"mrr@{k}"] = 1.0 / first_hit if first_hit is not None and first_hit <= k else 0.0
        metrics[f"ndcg@{k}"] = dcg / idcg
    metrics["mrr"] = metrics[f"mrr@{max(top_k_values)}"]
    return metrics


def evaluate_rag_pipeline(
    indexer: Any,
    eval_file: str | Path,
    top_k_values: Sequence[int] = (1, 3, 5),
    mode: str | None = None,
    split: str = "test",
    show_progress: bool = False,
    queries: Sequence[EvalQuery] | None = None,
    query_vectors: Any = None,
) -> dict[str, float]:
    """Retrieve for every eval query and average the metrics.

    ``indexer`` is a :class:`~src.rag.retriever.Retriever` (or a
    :class:`~src.rag.indexer.RagIndex`, which gets the default retriever); ``mode`` is
    ``dense`` | ``bm25`` | ``hybrid`` (default: the retriever's). Returns
    ``{"recall@k", "precision@k", "hit_rate@k", "mrr@k", "ndcg@k" for each k, "mrr",
    "num_queries"}``. ``queries``: score these (a split of the file's) instead of reading ``eval_file``;
    ``query_vectors``: their embeddings, when already made (a :class:`Retriever` only).
    """
    from src.rag.indexer import RagIndex
    from src.rag.retriever import Retriever

    retriever = Retriever(indexer) if isinstance(indexer, RagIndex) else indexer
    top_k_values = sorted({int(k) for k in top_k_values})
    if not top_k_values or top_k_values[0] <= 0:
        raise ValueError(f"top_k_values must be positive integers (got {top_k_values})")
    queries = list(queries) if queries is not None else read_eval_queries(eval_file, split)

    indexed = getattr(getattr(retriever, "index", None), "documents", None)
    if indexed is not None:
        unknown = {d for q in queries for d in q.relevance if d not in indexed}
        if unknown:
            log.warning("%s: %d relevant document id(s) are not in the index, e.g. %s", eval_file, len(unknown), sorted(unknown)[0])

    texts, depth = [q.query for q in queries], max(top_k_values)
    if query_vectors is not None:
        rankings = retriever.search_batch(texts, top_k=depth, mode=mode, query_vectors=query_vectors)
    elif hasattr(retriever, "search_batch"):
        rankings = retriever.search_batch(texts, top_k=depth, mode=mode)
    else:  # any object with search(query, top_k, mode) -> results with .doc_id
        rankings = [retriever.search(text, top_k=depth, mode=mode) for text in texts]
    totals: dict[str, float] = {}
    for query, results in tqdm(list(zip(queries, rankings)), desc="evaluating", unit="query", disable=not show_progress):
        per_query = retrieval_metrics([r.doc_id for r in results], query.relevance, top_k_values)
        for name, value in per_query.items():
            totals[name] = totals.get(name, 0.0) + value
    metrics = {name: value / len(queries) for name, value in totals.items()}
    metrics["num_queries"] = len(queries)
    return metrics


def format_metrics_table(metrics_by_mode: dict[str, dict[str, float]], top_k_values: Sequence[int]) -> str:
    """A plain-text table: one row per mode, columns recall/precision/hit rate/nDCG at each k, and MRR."""
    top_k_values = sorted(set(top_k_values))
    columns = [f"{name}@{k}" for name in ("recall", "precision", "hit_rate", "ndcg") for k in top_k_values] + ["mrr"]
    widths = [max(len(c), 6) for c in columns]
    mode_width = max([4] + [len(m) for m in metrics_by_mode])
    header = "mode".ljust(mode_width) + "  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    lines = [header, "-" * len(header)]
    for mode, metrics in metrics_by_mode.items():
        cells = [f"{metrics[c]:.4f}".rjust(w) for c, w in zip(columns, widths)]
        lines.append(mode.ljust(mode_width) + "  " + "  ".join(cells))
    return "\n".join(lines)


def evaluate_modes(cfg: RagConfig, retriever: Retriever, log) -> dict[str, Any]:
    """Score every mode of ``cfg.retrieval.eval_modes`` on ``cfg.data.eval_file``; prints the table.

    Returns ``{"modes": {mode: {metric@k: value, "mrr", "num_queries", "seconds"}}}``. With
    ``retrieval.eval_val_fraction`` > 0 the queries are split (:func:`split_eval_queries`,
    ``system.seed``): ``modes`` holds the test split's numbers, ``val_modes`` the val split's,
    the ``hybrid_fusions`` are scored too, and ``hybrid_selected`` is the one with the best
    recall at the largest cut-off on val (then nDCG, then the listed order).
    """
    if cfg.data.eval_file is None:
        raise ConfigError("data.eval_file: --evaluate needs an eval file (JSONL {query, relevant_docs} or a BEIR folder)")
    if not Path(cfg.data.eval_file).exists():
        raise DataError(f"{cfg.data.eval_file}: eval file not found (the sample data is made by `python -m src.data.prepare`)")
    rc = cfg.retrieval
    queries = read_eval_queries(cfg.data.eval_file, cfg.data.beir_split)
    splits = {"test": queries}
    modes = list(dict.fromkeys(rc.eval_modes))
    if rc.eval_val_fraction > 0:
        val, test = split_eval_queries(queries, rc.eval_val_fraction, cfg.system.seed)
        if not val or not test:
            raise ConfigError(f"retrieval.eval_val_fraction: {rc.eval_val_fraction} of {len(queries)} queries leaves an empty split")
        splits = {"val": val, "test": test}
        modes = list(dict.fromkeys(modes + list(rc.hybrid_fusions)))
    by_split: dict[str, dict[str, dict[str, float]]] = {}
    for split, subset in splits.items():
        by_split[split] = {}
        vectors = retriever.embed_queries([q.query for q in subset]) if any(m != "bm25" for m in modes) else None  # once for every mode
        for mode in modes:
            start = time.perf_counter()
            by_split[split][mode] = evaluate_rag_pipeline(
                retriever, cfg.data.eval_file, rc.eval_top_k, mode=mode, queries=subset, query_vectors=vectors
            )
            by_split[split][mode]["seconds"] = round(time.perf_counter() - start, 3)
    out: dict[str, Any] = {"modes": by_split["test"]}
    label = f"{len(queries)} queries"
    if "val" in by_split:
        k = max(rc.eval_top_k)
        fusions = list(dict.fromkeys(rc.hybrid_fusions))
        selected = max(fusions, key=lambda m: (by_split["val"][m][f"recall@{k}"], by_split["val"][m][f"ndcg@{k}"], -fusions.index(m)))
        out.update(val_modes=by_split["val"], hybrid_selected=selected,
                   split={"val_queries": len(splits["val"]), "test_queries": len(splits["test"]), "seed": cfg.system.seed,
                          "val_fraction": rc.eval_val_fraction, "selected_by": f"recall@{k} on val, then ndcg@{k}"})
        label = f"test split: {len(splits['test'])} of {len(queries)} queries; hybrid fusion chosen on val: {selected}"
        val_table = format_metrics_table(by_split["val"], rc.eval_top_k)
        print(f"\nRetrieval on {cfg.data.eval_file}, val split ({len(splits['val'])} queries)\n{val_table}\n")
    table = format_metrics_table(by_split["test"], rc.eval_top_k)
    print(f"\nRetrieval on {cfg.data.eval_file} ({label}, {len(retriever.index.documents)} documents)\n{table}\n")
    log.info("retrieval metrics (%s):\n%s", label, table)
    return out


def plot_retrieval_metrics(metrics_by_mode: dict[str, dict[str, float]], top_k_values: list[int], path: Path) -> Path:
    """Bar charts of recall / precision / hit rate / nDCG at each k, one bar per mode, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(set(top_k_values))
    names = ("recall", "precision", "hit_rate", "ndcg")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), sharey=True)
    width = 0.8 / len(metrics_by_mode)  # modes side by side, so equal values don't hide each other
    for ax, name in zip(axes, names):
        for i, (mode, metrics) in enumerate(metrics_by_mode.items()):
            xs = [j + (i - (len(metrics_by_mode) - 1) / 2) * width for j in range(len(ks))]
            ax.bar(xs, [metrics[f"{name}@{k}"] for k in ks], width, label=mode)
        ax.set_title(f"{name}@k")
        ax.set_xticks(range(len(ks)), [f"k={k}" for k in ks])
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="mode", loc="center right")
    mrr = ", ".join(f"{mode} {m['mrr']:.3f}" for mode, m in metrics_by_mode.items())
    fig.suptitle(f"RAG retrieval ({next(iter(metrics_by_mode.values()))['num_queries']} queries); MRR: {mrr}")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
