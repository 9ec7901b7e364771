"""Does the retrieval policy earn its place? The RL recipe on several retrieval sets, three seeds.

Sets (each a documents JSONL, its labeled queries and a RAG index built by MARK's own indexer,
cached under ``checkpoints/bench_retrieval_policy/<set>/``; the sample set uses ``checkpoints/rag``, the
index ``make demo`` builds over the sample data, when it exists):

* ``sample-hard``: the sample corpus (stdlib docstrings) with ``rag_eval_hard.jsonl``, its
  questions reworded away from the documents' words (src/data/rag_hard.py);
* ``man-commands``: 400 manual pages of sections 1 and 8, the NAME line as the question
  (src/data/man_pages.py);
* ``man-system``: 400 manual pages of sections 2, 3, 5 and 7 (system calls, C library,
  file formats, overviews), same construction.

For every set and seed, ``src.rl.train.run`` trains a policy on the labeled queries'
train split (``env.queries=labeled``) and one on synthetic queries only
(``env.queries=synthetic``); both are evaluated on the same fixed test split of labeled
queries. Reported per set (means over seeds): the trained policy, the best fixed strategy
**chosen on val** and measured on test, the best fixed strategy in hindsight on test, the
oracle (best action per query), and the share of the gap closed
``(trained - best fixed on val) / (oracle - best fixed on val)``.

    python bench/retrieval_policy.py [--sets sample-hard man-commands] [--seeds 1 2 3] [--timesteps N]
    python bench/retrieval_policy.py --sweep-synthetic      # choose the synthetic-query settings on val

Writes ``bench/results/retrieval_policy.json`` (or ``retrieval_policy_synthetic_sweep.json``)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.core.config import load_config  # noqa: E402
from src.core.errors import DataError  # noqa: E402
from src.core.runtime import machine_summary  # noqa: E402
from src.data.man_pages import build_man_page_corpus, write_corpus  # noqa: E402
from src.rl import train as rl_train  # noqa: E402
from src.rl.config import RLConfig  # noqa: E402
from src.rl.retrieval_env import TABLE_FILE  # noqa: E402

WORK = REPO / "checkpoints" / "bench_retrieval_policy"
RESULTS = REPO / "bench" / "results"
SETS = ("sample-hard", "man-commands", "man-system")
# Sized for 2 shared cores: embedding 400 pages of at most 1000 characters takes a few minutes.
MAN_DOCS, MAN_DOC_CHARS = 400, 1000
MAN_SECTIONS = {"man-commands": ["1", "8"], "man-system": ["2", "3", "5", "7"]}


def prepare_set(name: str) -> tuple[Path, Path, Path]:
    """``(documents_file, eval_file, index_dir)`` of a set, building what is missing."""
    folder = WORK / name
    if name == "sample-hard":
        from src.data.prepare import prepare_sample_data

        paths = prepare_sample_data(REPO / "data")
        documents, queries = paths["documents"], paths["rag_eval_hard"]
        if (REPO / "checkpoints" / "rag" / "faiss.index").is_file():  # the sample index `make demo` builds
            return documents, queries, REPO / "checkpoints" / "rag"
    else:
        documents, queries = folder / "data" / "documents.jsonl", folder / "data" / "rag_eval.jsonl"
        if not documents.is_file():
            docs, qs = build_man_page_corpus(MAN_SECTIONS[name], max_docs=MAN_DOCS, max_chars=MAN_DOC_CHARS)
            write_corpus(folder / "data", docs, qs)
    index_dir = folder / "index"
    if not (index_dir / "faiss.index").is_file():
        from src.scripts import train_rag_indexer

        train_rag_indexer.main([
            "--config", str(REPO / "configs" / "rag_indexer.yaml"), "--device", "cpu",
            f"data.documents_file={documents}", f"data.eval_file={queries}",
            f"paths.checkpoint_dir={index_dir}", f"paths.log_dir={folder / 'index_logs'}",
        ])
    return documents, queries, index_dir


def run_policy(name: str, seed: int, queries: str, overrides: dict, tag: str = "") -> dict:
    """One ``src.rl.train.run`` on a set; returns its test-split (and val) numbers."""
    documents, eval_file, index_dir = prepare_set(name)
    run_dir = WORK / name / "runs" / f"{queries}{tag}-seed{seed}"
    values = {
        "data.rag_index_dir": index_dir, "data.eval_file": eval_file, "data.documents_file": documents,
        "paths.checkpoint_dir": run_dir / "ckpt", "paths.log_dir": run_dir / "logs",
        "system.seed": seed, "system.device": "cpu", "env.queries": queries, "training.show_progress": "false",
        "env.synthetic.seed": 0,
        **overrides,
    }
    # Same index, queries and actions for every seed (synthetic queries from one fixed seed): one table.
    shared_table = WORK / name / f"{queries}{tag}_table.pt"
    if shared_table.is_file():
        (run_dir / "ckpt").mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_table, run_dir / "ckpt" / TABLE_FILE)
    cfg = load_config(REPO / "configs" / "rl_train.yaml", RLConfig, [f"{k}={v}" for k, v in values.items()])
    rl_train.run(cfg)
    if not shared_table.is_file():
        shutil.copy(run_dir / "ckpt" / TABLE_FILE, shared_table)
    report = json.loads((run_dir / "ckpt" / "eval_metrics.json").read_text())
    test = report["test_split"]
    fixed_test = {n.removeprefix("fixed "): r["mean_reward"] for n, r in test["strategies"].items() if n.startswith("fixed ")}
    hindsight = max(fixed_test, key=fixed_test.get)
    val = report["summary"]
    out = {
        "trained": test["trained_mean_reward"],
        "best_fixed_on_val": test["best_fixed"],
        "best_fixed_val_choice": test["best_fixed_mean_reward"],
        "best_fixed_hindsight": hindsight,
        "best_fixed_hindsight_reward": fixed_test[hindsight],
        "oracle": test["oracle_mean_reward"],
        "val_trained": val["trained_mean_reward"],
        "val_best_fixed": val["best_fixed_mean_reward"],
        "val_oracle": report["strategies"]["oracle"]["mean_reward"],
        "test_queries": test["queries"],
        "train_queries": report.get("train_split", {}).get("queries"),
    }
    out["gap_closed"] = gap_closed(out["trained"], out["best_fixed_val_choice"], out["oracle"])
    return out


def gap_closed(trained: float, fixed: float, oracle: float) -> float:
    """Share of the gap between the best fixed strategy and the oracle that the policy closes."""
    return (trained - fixed) / (oracle - fixed) if oracle > fixed else 0.0


def summarise(runs: list[dict]) -> dict:
    keys = ("trained", "best_fixed_val_choice", "best_fixed_hindsight_reward", "oracle", "val_trained", "val_best_fixed", "val_oracle")
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    mean["gap_closed"] = gap_closed(mean["trained"], mean["best_fixed_val_choice"], mean["oracle"])
    mean["gap_closed_per_seed"] = [round(r["gap_closed"], 3) for r in runs]
    mean["trained_minus_best_fixed"] = mean["trained"] - mean["best_fixed_val_choice"]
    mean["best_fixed_on_val"] = sorted({r["best_fixed_on_val"] for r in runs})
    mean["best_fixed_hindsight"] = sorted({r["best_fixed_hindsight"] for r in runs})
    mean["test_queries"] = runs[0]["test_queries"]
    return mean


def format_table(summary: dict) -> str:
    header = f"{'set':14} {'train on':10} {'policy':>7} {'fixed(val)':>10} {'fixed(hs)':>9} {'oracle':>7} {'gap closed':>10}  per seed"
    lines = [header, "-" * len(header)]
    for name, by_queries in summary.items():
        for queries, s in by_queries.items():
            lines.append(f"{name:14} {queries:10} {s['trained']:7.3f} {s['best_fixed_val_choice']:10.3f} {s['best_fixed_hindsight_reward']:9.3f} "
                         f"{s['oracle']:7.3f} {100 * s['gap_closed']:9.0f}%  {s['gap_closed_per_seed']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--queries", nargs="+", default=["labeled", "synthetic"], choices=["labeled", "synthetic", "both"])
    parser.add_argument("--sweep-synthetic", action="store_true", help="compare synthetic-query settings on the val split")
    parser.add_argument("--sweep-grid", nargs="+", default=["sentence:0.3", "sentence:0.5", "sentence:0.7", "sentence:1.0", "title:1.0"],
                        metavar="SOURCE:KEEP[:SUBSTITUTE]",
                        help="the (env.synthetic.source, keep_shared[, substitute]) settings --sweep-synthetic compares")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="RL config override for every run")
    parser.add_argument("--out", default=None, help="result JSON (default: bench/results/retrieval_policy.json)")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    started = time.perf_counter()
    if args.sweep_synthetic:
        return sweep_synthetic(args, overrides)
    results: dict = {"sets": {}, "seeds": args.seeds, "overrides": overrides}
    summary: dict = {}
    for name in args.sets:
        results["sets"][name] = {}
        summary[name] = {}
        for queries in args.queries:
            runs = [run_policy(name, seed, queries, overrides) for seed in args.seeds]
            results["sets"][name][queries] = {"runs": runs, "mean": summarise(runs)}
            summary[name][queries] = results["sets"][name][queries]["mean"]
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["machine"] = machine_summary()
    table = format_table(summary)
    print("\nmean reward on the test split (nDCG@k - 0.02 per extra document), means over seeds\n" + table)
    out = Path(args.out) if args.out else RESULTS / "retrieval_policy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


def sweep_synthetic(args, overrides: dict) -> dict:
    """Synthetic-only policies with each (source, keep_shared), judged on the labeled val split."""
    grid = [(g.split(":")[0], float(g.split(":")[1]), float(g.split(":")[2]) if g.count(":") == 2 else 0.0) for g in args.sweep_grid]
    results: dict = {"grid": [], "seeds": args.seeds}
    for source, keep, substitute in grid:
        row = {"source": source, "keep_shared": keep, "substitute": substitute, "sets": {}}
        settings = {"env.synthetic.source": source, "env.synthetic.keep_shared": keep, "env.synthetic.substitute": substitute}
        tag = f"-{source}-{keep}" + (f"-sub{substitute}" if substitute else "")
        for name in args.sets:
            try:
                runs = [run_policy(name, seed, "synthetic", {**overrides, **settings}, tag=tag) for seed in args.seeds]
            except DataError as err:  # this source gives no queries on this corpus: recorded, the sweep goes on
                row["sets"][name] = {"error": str(err)}
                print(f"{source:8} keep {keep:.1f} {name:14} {err}", flush=True)
                continue
            row["sets"][name] = {"val_trained": float(np.mean([r["val_trained"] for r in runs])),
                                 "val_best_fixed": float(np.mean([r["val_best_fixed"] for r in runs]))}
            print(f"{source:8} keep {keep:.1f} sub {substitute:.1f} {name:14} val policy {row['sets'][name]['val_trained']:.3f} "
                  f"best fixed {row['sets'][name]['val_best_fixed']:.3f}", flush=True)
        results["grid"].append(row)
    out = Path(args.out) if args.out else RESULTS / "retrieval_policy_synthetic_sweep.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
