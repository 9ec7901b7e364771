"""Is the learner or the observation the limit? A supervised per-action reward regression on the
retrieval policy's own observation features, against the same protocol as PPO.

The retrieval environment is one step per query, and its table holds every action's reward for
every query (full information), so the policy can also be learned as regression: one model per
action predicts the reward from the query's signals (``src.rl.features``, the default
observation: ``query_embedding_dims: 0``), the policy takes the action with the highest
prediction. Ridge regression (standardised features) and gradient-boosted trees (depth 2), fitted
on the train split of each seed; the share of the gap closed on val and on test, as
``bench/retrieval_policy.py`` reports it (best fixed strategy chosen on val). Reads the tables that
``bench/retrieval_policy.py --queries labeled`` caches under ``checkpoints/bench_retrieval_policy``.

    python bench/retrieval_policy_regression.py [--seeds 1 2 3] [--out bench/results/retrieval_policy_regression.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sklearn.ensemble import HistGradientBoostingRegressor  # noqa: E402
from sklearn.linear_model import Ridge  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from retrieval_policy import SETS, WORK, gap_closed  # noqa: E402  (bench/retrieval_policy.py, beside this file)

from src.core.checkpoint import atomic_write_json  # noqa: E402
from src.core.config import load_config  # noqa: E402
from src.rl.config import RLConfig  # noqa: E402
from src.rl.retrieval_env import RetrievalTable  # noqa: E402
from src.rl.train import split_retrieval_queries  # noqa: E402

MODELS = {
    "ridge alpha 1": lambda seed: Ridge(alpha=1.0),
    "ridge alpha 10": lambda seed: Ridge(alpha=10.0),
    "ridge alpha 100": lambda seed: Ridge(alpha=100.0),
    "boosted trees x50": lambda seed: HistGradientBoostingRegressor(max_depth=2, max_iter=50, learning_rate=0.05, random_state=seed),
    "boosted trees x100": lambda seed: HistGradientBoostingRegressor(max_depth=2, max_iter=100, learning_rate=0.05, random_state=seed),
}
# The reward and the splits of the config bench/retrieval_policy.py trains with.
ENV = load_config(REPO / "configs" / "rl_train.yaml", RLConfig).env


def run_set(table: RetrievalTable, make_model, seeds: list[int]) -> dict:
    rewards = table.rewards(ENV.cost_per_extra_doc)
    val_gaps, test_gaps = [], []
    for seed in seeds:
        train, val, test = split_retrieval_queries(table, "labeled", ENV.heldout_fraction, ENV.test_fraction, seed)
        scaler = StandardScaler().fit(table.signals[train])
        features = scaler.transform(table.signals)
        predicted = np.stack([make_model(seed).fit(features[train], rewards[train, a]).predict(features)
                              for a in range(rewards.shape[1])], axis=1)
        choice = predicted.argmax(axis=1)
        best_fixed = int(np.argmax(rewards[val].mean(axis=0)))  # chosen on val, as the protocol does
        for ids, out in ((val, val_gaps), (test, test_gaps)):
            out.append(gap_closed(float(rewards[ids, choice[ids]].mean()), float(rewards[ids, best_fixed].mean()),
                                  float(rewards[ids].max(axis=1).mean())))
    return {"val_gap_closed": float(np.mean(val_gaps)), "test_gap_closed": float(np.mean(test_gaps)),
            "val_per_seed": [round(g, 3) for g in val_gaps], "test_per_seed": [round(g, 3) for g in test_gaps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "retrieval_policy_regression.json")
    args = parser.parse_args()
    results: dict = {"seeds": args.seeds, "sets": {}}
    print(f"{'set':14} {'model':20} {'val gap':>8} {'test gap':>9}")
    for name in SETS:
        path = WORK / name / "labeled_table.pt"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python bench/retrieval_policy.py --queries labeled` first")
        table = RetrievalTable.from_state(torch.load(path, weights_only=False))
        results["sets"][name] = {}
        for model_name, make_model in MODELS.items():
            row = run_set(table, make_model, args.seeds)
            results["sets"][name][model_name] = row
            print(f"{name:14} {model_name:20} {row['val_gap_closed']:>8.0%} {row['test_gap_closed']:>9.0%}")
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
