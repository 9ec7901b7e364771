"""The targets table: every model against its baseline, read from the stages' own metrics
(src/pipelines/targets.py)."""

from src.pipelines.targets import check_targets, format_targets

# The stage metrics of the issue-23 demo run (the shapes the components return).
METRICS = {
    "train_mamba": {"best_val_perplexity": 67.6, "kn3_val_perplexity": 62.83, "unigram_val_perplexity": 506.5},
    "train_transformer": {"test_macro_f1": 0.700, "tfidf_macro_f1": 0.7335, "majority_macro_f1": 0.174},
    "build_rag": {"recall@5": 0.90, "num_queries": 400, "bm25/recall@5": 0.85, "hybrid/recall@5": 0.91, "mrr": 0.757},
    "train_rl": {"trained_mean_reward": 0.963, "best_fixed_mean_reward": 0.969, "test_queries": 80,
                 "test_trained_mean_reward": 0.920, "test_best_fixed_mean_reward": 0.888, "test_best_fixed": "dense k=3"},
    "train_rlhf": {"evaluation": {"reward_model_test_accuracy": 0.971, "baseline_cosine_test_accuracy": 0.913,
                                  "reward_model_test_pairs": 207, "num_prompts": 207, "dpo_win_rate_vs_sft": 0.708,
                                  "ppo_win_rate_vs_sft": 0.58}},
}


def test_each_row_reads_its_baseline_from_the_stage_metrics_and_names_its_split():
    checks = {(c.stage, c.metric): c for c in check_targets(METRICS)}
    mamba = checks["train_mamba", "perplexity"]
    assert (mamba.value, mamba.baseline, mamba.split, mamba.passed) == (67.6, 62.83, "val", False)  # needs <= 56.5
    classifier = checks["train_transformer", "macro-F1"]
    assert (classifier.baseline, classifier.split, classifier.passed) == (0.7335, "test", False)
    rag = checks["build_rag", "hybrid recall@5"]
    assert (rag.value, rag.baseline, rag.split, rag.passed) == (0.91, 0.90, "rag_eval (400 queries)", True)
    rl = checks["train_rl", "mean reward"]  # the test split's numbers, not the val split's 0.963 / 0.969
    assert (rl.value, rl.baseline, rl.split, rl.passed) == (0.920, 0.888, "test (80 queries)", True)
    rm = checks["train_rlhf", "reward-model accuracy"]
    assert (rm.value, rm.baseline, rm.split, rm.passed) == (0.971, 0.913, "test (207 pairs)", True)
    assert checks["train_rlhf", "DPO win rate vs SFT"].passed is True
    assert checks["train_rlhf", "PPO win rate vs SFT"].passed is False  # 0.58 < 0.6
    assert checks["train_rlhf", "PPO win rate vs SFT"].split == "test (207 prompts)"

    # The baseline column moves with the stage's measured baseline: nothing is a constant.
    better_baselines = {**METRICS, "train_mamba": {"best_val_perplexity": 50.0, "kn3_val_perplexity": 55.0},
                        "train_transformer": {"test_macro_f1": 0.80, "tfidf_macro_f1": 0.76}}
    checks = {(c.stage, c.metric): c for c in check_targets(better_baselines)}
    assert checks["train_mamba", "perplexity"].baseline == 55.0 and not checks["train_mamba", "perplexity"].passed  # 50 > 49.5
    assert checks["train_transformer", "macro-F1"].baseline == 0.76 and checks["train_transformer", "macro-F1"].passed


def test_the_table_marks_each_row_and_missing_numbers():
    metrics = {**METRICS, "build_rag": {"recall@5": 0.9}}  # a single mode evaluated: nothing to compare
    metrics["train_rlhf"] = {"evaluation": {**METRICS["train_rlhf"]["evaluation"]}}
    del metrics["train_rlhf"]["evaluation"]["ppo_win_rate_vs_sft"]  # --method dpo: no PPO row
    checks = check_targets(metrics)
    assert [c.stage for c in checks].count("train_rlhf") == 2
    table = format_targets(checks)
    lines = table.strip().splitlines()
    assert lines[0].startswith("Every model against its baseline")
    row = {line.split()[0] + " " + line.split()[1]: line for line in lines[3:-1]}
    assert row["train_mamba val"].endswith("✗") and "Kneser-Ney 3-gram 62.83" in row["train_mamba val"]
    assert row["build_rag rag_eval"].endswith("?")
    assert row["train_rl test"].endswith("✓") and "best fixed strategy (chosen on val) 0.888" in row["train_rl test"]
    assert lines[-1] == "3 of 6 targets met"


def test_the_configured_retrieval_mode_is_unprefixed():
    """build_rag reports its configured mode's metrics unprefixed and the others as
    ``<mode>/<metric>``: with ``mode: hybrid`` the hybrid number is the unprefixed one."""
    hybrid_primary = {"recall@5": 0.93, "dense/recall@5": 0.90, "bm25/recall@5": 0.95}
    (check,) = check_targets({"build_rag": hybrid_primary})
    assert (check.value, check.baseline, check.passed) == (0.93, 0.95, False)
