"""The evaluation protocol: test queries are fixed and labeled, splits never overlap, synthetic
queries only ever train, and the best fixed strategy is chosen on val, never on test."""

from __future__ import annotations

import numpy as np
import pytest

from src.rl.evaluate import summarize
from src.rl.retrieval_env import RetrievalAction, RetrievalTable
from src.rl import train as rl_train
from src.rl.train import split_retrieval_queries


def _table(labeled: int, synthetic: int) -> RetrievalTable:
    n = labeled + synthetic
    return RetrievalTable(
        queries=[f"q{i}" for i in range(n)], embeddings=np.zeros((n, 4), np.float32), signals=np.zeros((n, 3), np.float32),
        ndcg=np.zeros((n, 2), np.float32), num_retrieved=np.ones((n, 2), np.int64),
        actions=[RetrievalAction("dense", 1), RetrievalAction("bm25", 1)], corpus_checksum="x",
        synthetic=np.array([False] * labeled + [True] * synthetic),
    )


@pytest.mark.parametrize("queries", ["labeled", "synthetic", "both"])
def test_splits_are_disjoint_and_val_and_test_are_labeled(queries):
    table = _table(100, 60)
    for seed in (1, 2, 3):
        train, val, test = split_retrieval_queries(table, queries, 0.2, 0.2, seed)
        assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
        assert len(test) == 20 and len(val) == 16
        assert not table.synthetic[val].any() and not table.synthetic[test].any()
        assert table.synthetic[train].all() if queries == "synthetic" else True
        assert table.synthetic[train].sum() == (0 if queries == "labeled" else 60)
        assert (~table.synthetic[train]).sum() == (0 if queries == "synthetic" else 64)


def test_test_split_is_the_same_for_every_seed_and_setting():
    table = _table(100, 60)
    tests = {tuple(split_retrieval_queries(table, q, 0.2, 0.2, seed)[2]) for q in ("labeled", "synthetic", "both") for seed in (1, 2, 3)}
    assert len(tests) == 1
    vals = {tuple(split_retrieval_queries(table, "labeled", 0.2, 0.2, seed)[1]) for seed in (1, 2, 3)}
    assert len(vals) == 3  # val moves with the seed, test does not
    # the labeled rows are split the same whatever synthetic rows are appended
    assert tuple(split_retrieval_queries(_table(100, 0), "labeled", 0.2, 0.2, 1)[2]) in tests


def test_best_fixed_on_test_is_the_one_chosen_on_val():
    val = {"trained": {"mean_reward": 0.5}, "random": {"mean_reward": 0.1},
           "fixed dense@1": {"mean_reward": 0.6}, "fixed bm25@1": {"mean_reward": 0.4}, "oracle": {"mean_reward": 0.9}}
    test = {"trained": {"mean_reward": 0.55}, "random": {"mean_reward": 0.1},
            "fixed dense@1": {"mean_reward": 0.3}, "fixed bm25@1": {"mean_reward": 0.7}, "oracle": {"mean_reward": 0.95}}
    report = rl_train.test_split_report(test, summarize(val), 20)
    # bm25@1 is better on test, but dense@1 was the val choice: that is the baseline reported
    assert report["best_fixed"] == "dense@1" and report["best_fixed_mean_reward"] == 0.3
    assert report["trained_minus_best_fixed"] == pytest.approx(0.25)
