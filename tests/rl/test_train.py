"""``python -m src.scripts.train_rl`` end to end at small size: outputs, evaluation, exact
resume, the orchestrator's ``--target=rl``, other Gymnasium envs, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src.core.checkpoint import load_checkpoint, write_latest_pointer
from src.core.errors import CheckpointError, ConfigError, DataError
from src.rl.load import load_rl_policy
from src.rl.model import RLPolicy, choose_retrieval_action, retrieval_actions, retrieval_observation
from src.rl.retrieval_env import TABLE_FILE, QueryObservation, split_queries, split_test_queries
from src.scripts import train_rl
from src.training import orchestrator
from tests.rl.fixtures import rl_data_dir, rl_rag_index, rl_retriever, rl_run_args, rl_table  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(rl_table, tmp_path_factory):
    """One small run on the test index (2000 timesteps, a checkpoint every 500, all kept)."""
    root = tmp_path_factory.mktemp("rl_run")
    args = rl_run_args(root, "ref", **{"training.save_total_limit": 10})
    return root / "ref", args, train_rl.main(args)


def _records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_every_output(trained_run):
    run_dir, _, summary = trained_run
    ckpt = run_dir / "ckpt"
    assert summary["metrics"]["timesteps"] == 2000
    assert summary["outputs"]["final_model"] == str(ckpt / "final_model.pt")
    assert summary["outputs"]["last_checkpoint"] == str(ckpt / "checkpoint_step_2000.pt")
    assert sorted(p.name for p in ckpt.glob("checkpoint_step_*.pt")) == [f"checkpoint_step_{n}.pt" for n in (1000, 1500, 2000, 500)]
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 2000
    assert (ckpt / "config.yaml").is_file() and (ckpt / TABLE_FILE).is_file()
    assert (ckpt / "eval_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    state = load_checkpoint(ckpt / "checkpoint_step_1000.pt", kind="rl")  # weights_only=True
    assert state["step"] == 1000 and state["n_updates"] == 4 * 4  # SB3 counts n_epochs (4) per update: 4 rollouts
    assert {"policy", "optimizer", "obs_normalization", "rng", "env_states", "last_obs", "config"} <= set(state)
    assert state["obs_normalization"]["count"] > 1000  # statistics of every observation seen, plus the resets
    assert len(state["env_states"]) == 2

    log_text = (run_dir / "logs" / "train.log").read_text()
    assert "timesteps 2000/2000" in log_text and "evaluation on" in log_text
    records = _records(run_dir / "logs")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(250, 2001, 250))
    assert all({"loss", "approx_kl", "episode_reward_mean", "ndcg_mean", "k_mean"} <= set(r) for r in train)
    assert any(r["kind"] == "eval" for r in records)


def test_evaluation_compares_on_held_out_queries(trained_run, rl_table):
    run_dir, _, summary = trained_run
    report = json.loads((run_dir / "ckpt" / "eval_metrics.json").read_text())
    results = report["strategies"]
    labels = [a.label for a in rl_table.actions]
    assert set(results) == {"trained", "random", "oracle"} | {f"fixed {label}" for label in labels}
    rest, test = split_test_queries(rl_table.num_queries, 0.2)
    heldout = rest[split_queries(len(rest), 0.2, seed=42)[1]]
    rewards = rl_table.rewards(0.02)[heldout]
    for i, label in enumerate(labels):  # every fixed strategy scored on exactly the held-out queries
        assert results[f"fixed {label}"]["mean_reward"] == pytest.approx(float(rewards[:, i].mean()), abs=1e-6)
        assert results[f"fixed {label}"]["episodes"] == len(heldout)
        assert results[f"fixed {label}"]["mean_k"] == rl_table.actions[i].k
    assert results["oracle"]["mean_reward"] == pytest.approx(float(rewards.max(axis=1).mean()), abs=1e-6)
    best_fixed = max(results[f"fixed {label}"]["mean_reward"] for label in labels)
    assert report["summary"]["best_fixed_mean_reward"] == pytest.approx(best_fixed)
    # Trained on the training queries, it does better than chance on queries it never saw.
    trained = results["trained"]["mean_reward"]
    assert trained > results["random"]["mean_reward"] + 0.05
    assert trained <= results["oracle"]["mean_reward"] + 1e-9
    assert summary["metrics"]["trained_mean_reward"] == pytest.approx(trained)
    assert report["train_split"]["queries"] == rl_table.num_queries - len(heldout) - len(test)

    # The test split: untouched by training and tuning, scored the same way; the best fixed
    # strategy is the one the val (held-out) split picked, measured on the test queries.
    split = report["test_split"]
    test_rewards = rl_table.rewards(0.02)[test]
    assert split["queries"] == len(test) == summary["metrics"]["test_queries"]
    assert split["best_fixed"] == report["summary"]["best_fixed"]
    picked = labels.index(split["best_fixed"])
    assert split["best_fixed_mean_reward"] == pytest.approx(float(test_rewards[:, picked].mean()), abs=1e-6)
    assert split["oracle_mean_reward"] == pytest.approx(float(test_rewards.max(axis=1).mean()), abs=1e-6)
    assert split["trained_mean_reward"] == pytest.approx(summary["metrics"]["test_trained_mean_reward"])
    assert split["trained_mean_reward"] > split["strategies"]["random"]["mean_reward"]


def test_final_model_picks_retrieval_strategies_for_query_strings(trained_run, rl_table, rl_retriever):
    run_dir, _, _ = trained_run
    policy = load_rl_policy(run_dir / "ckpt" / "final_model.pt")
    assert isinstance(policy, RLPolicy) and policy.timesteps == 2000
    assert [a.label for a in retrieval_actions(policy)] == [a.label for a in rl_table.actions]
    observation = QueryObservation.from_state(policy.env_info["observation"])
    table_obs = observation(rl_table.embeddings, rl_table.signals)
    for qi in range(0, rl_table.num_queries, 10):
        query = rl_table.queries[qi]
        live = retrieval_observation(policy, rl_retriever, query)
        np.testing.assert_allclose(live, table_obs[qi], atol=1e-4)
        choice = choose_retrieval_action(policy, rl_retriever, query)
        assert choice == rl_table.actions[policy.act(table_obs[qi])]
        assert len(rl_retriever.search(query, top_k=choice.k, mode=choice.mode)) <= choice.k


def _resume_from(trained_run, tmp_path, step):
    """A fresh checkpoint folder holding only ``checkpoint_step_<step>.pt`` of the reference run,
    as if training had been killed right after writing it; then ``--resume``."""
    run_dir, args, _ = trained_run
    ckpt = tmp_path / "resumed" / "ckpt"
    ckpt.mkdir(parents=True)
    shutil.copy(run_dir / "ckpt" / f"checkpoint_step_{step}.pt", ckpt)
    shutil.copy(run_dir / "ckpt" / TABLE_FILE, ckpt)
    write_latest_pointer(ckpt, ckpt / f"checkpoint_step_{step}.pt", step)
    resumed_args = [a for a in args if not a.startswith("paths.")]
    resumed_args += [f"paths.checkpoint_dir={ckpt}", f"paths.log_dir={tmp_path / 'resumed' / 'logs'}", "--resume"]
    return ckpt, train_rl.main(resumed_args)


def test_resume_continues_exactly_where_the_checkpoint_left_off(trained_run, tmp_path):
    run_dir, _, _ = trained_run
    ckpt, summary = _resume_from(trained_run, tmp_path, 1000)
    assert summary["metrics"]["timesteps"] == 2000  # the configured total, not 1000 + 2000
    reference = load_checkpoint(run_dir / "ckpt" / "final_model.pt")
    resumed = load_checkpoint(ckpt / "final_model.pt")
    for name, tensor in reference["policy"].items():
        assert torch.equal(tensor, resumed["policy"][name]), name
    for key in ("mean", "var"):
        assert torch.equal(reference["obs_normalization"][key], resumed["obs_normalization"][key])
    steps = [r["step"] for r in _records(tmp_path / "resumed" / "logs") if r["kind"] == "train"]
    assert steps == [1250, 1500, 1750, 2000]
    assert "resumed from" in (tmp_path / "resumed" / "logs" / "train.log").read_text()


def test_resume_of_a_finished_run_trains_no_more(trained_run, tmp_path):
    run_dir, _, _ = trained_run
    ckpt, summary = _resume_from(trained_run, tmp_path, 2000)
    assert summary["metrics"]["timesteps"] == 2000
    assert not [r for r in _records(tmp_path / "resumed" / "logs") if r["kind"] == "train"]
    reference = load_checkpoint(run_dir / "ckpt" / "final_model.pt")["policy"]
    assert all(torch.equal(t, load_checkpoint(ckpt / "final_model.pt")["policy"][n]) for n, t in reference.items())


def test_resume_refuses_a_checkpoint_of_another_setup(trained_run, tmp_path):
    run_dir, args, _ = trained_run
    with pytest.raises(CheckpointError, match=r"checkpoint_step_2000\.pt: was trained with another env query_embedding_dims"):
        train_rl.main(args + ["env.query_embedding_dims=4", "--resume"])
    with pytest.raises(CheckpointError, match="policy network"):
        train_rl.main(args + ["model.hidden_dim=32", "--resume"])


def test_orchestrator_trains_a_gymnasium_env_and_resumes_it(tmp_path):
    common = ["train", "--target=rl", "--config", str(REPO / "configs" / "rl_cartpole.yaml"), "--device", "cpu",
              f"paths.checkpoint_dir={tmp_path / 'ckpt'}", f"paths.log_dir={tmp_path / 'logs'}",
              "training.n_envs=2", "training.n_steps=64", "training.batch_size=64", "training.n_epochs=2",
              "training.save_freq=256", "training.eval_episodes=3", "training.show_progress=false"]
    first = orchestrator.main(common + ["training.total_timesteps=512"])
    assert first["metrics"]["timesteps"] == 512
    report = json.loads((tmp_path / "ckpt" / "eval_metrics.json").read_text())
    assert set(report["strategies"]) == {"trained", "random", "fixed action=0", "fixed action=1"}
    assert report["strategies"]["fixed action=0"]["mean_reward"] < 12  # always pushing left falls at once
    resumed = orchestrator.main(common + ["training.total_timesteps=1024", "--resume"])
    assert resumed["metrics"]["timesteps"] == 1024
    assert load_checkpoint(tmp_path / "ckpt" / "checkpoint_step_1024.pt", kind="rl")["n_updates"] == 8 * 2
    policy = load_rl_policy(tmp_path / "ckpt" / "final_model.pt")
    assert policy.act(np.zeros(4, dtype=np.float32)) in (0, 1) and policy.env_info == {"id": "CartPole-v1"}


def test_unknown_environment_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="env.id: 'NoSuchEnv-v9' is not a registered Gymnasium environment"):
        train_rl.main(["--config", str(REPO / "configs" / "rl_cartpole.yaml"), "env.id=NoSuchEnv-v9",
                       f"paths.checkpoint_dir={tmp_path}/c", f"paths.log_dir={tmp_path}/l"])


def test_cli_without_a_rag_index_is_one_line_and_exit_2(tmp_path, rl_data_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "src.scripts.train_rl", "--config", "configs/rl_train.yaml",
         f"data.rag_index_dir={tmp_path / 'no_index'}", f"data.eval_file={rl_data_dir / 'rag_eval.jsonl'}",
         f"paths.checkpoint_dir={tmp_path / 'c'}", f"paths.log_dir={tmp_path / 'l'}"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "train_rag_indexer" in proc.stderr.strip().splitlines()[-1]


def test_synthetic_source_that_gives_no_query_is_one_line(rl_table, tmp_path):
    docs = tmp_path / "one_word_titles.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Title{i}\n\nSome body text of document {i} goes here."}) + "\n" for i in range(4)))
    args = rl_run_args(tmp_path, "no_synthetic", **{"env.queries": "synthetic", "env.synthetic.source": "title", "data.documents_file": docs})
    with pytest.raises(DataError, match=r"env.synthetic.source=title: no document of .*one_word_titles.jsonl gives a query of 2 or more words"):
        train_rl.main(args)


def test_val_evaluations_do_not_change_training_and_best_val_picks_the_best_one(trained_run, tmp_path):
    """``training.eval_freq`` plays the policy on the val split at rollout boundaries without
    touching training (the same weights as a run without it, bit for bit); ``best_model.pt`` is
    the evaluated policy with the highest val reward, and ``final_policy: best_val`` serves it."""
    run_dir, args, _ = trained_run
    runs = {}
    for final in ("last", "best_val"):
        base = [a for a in args if not a.startswith("paths.")]
        out = tmp_path / final
        runs[final] = train_rl.main(base + [f"paths.checkpoint_dir={out / 'ckpt'}", f"paths.log_dir={out / 'logs'}",
                                            "training.eval_freq=500", f"training.final_policy={final}"])
    reference = load_checkpoint(run_dir / "ckpt" / "final_model.pt")["policy"]
    last = load_checkpoint(tmp_path / "last" / "ckpt" / "final_model.pt")
    assert all(torch.equal(t, last["policy"][n]) for n, t in reference.items())
    assert last["timesteps"] == 2000

    evals = [r for r in _records(tmp_path / "best_val" / "logs") if r["kind"] == "eval" and "val_mean_reward" in r]
    assert [r["step"] for r in evals] == [500, 1000, 1500, 2000]
    best_reward = max(r["val_mean_reward"] for r in evals)  # metrics.jsonl rounds to 6 digits
    best_step = next(r["step"] for r in evals if r["val_mean_reward"] == best_reward)  # the first of equals
    report = json.loads((tmp_path / "best_val" / "ckpt" / "eval_metrics.json").read_text())
    assert report["best_on_val"]["timesteps"] == best_step
    assert report["best_on_val"]["val_mean_reward"] == pytest.approx(best_reward, abs=1e-6)
    assert report["final_policy"] == "best_val" and report["policy_timesteps"] == best_step
    # The served policy is the best one: the final evaluation on val reproduces its reward.
    assert report["summary"]["trained_mean_reward"] == pytest.approx(report["best_on_val"]["val_mean_reward"], abs=1e-9)
    final = load_checkpoint(tmp_path / "best_val" / "ckpt" / "final_model.pt")
    best = load_checkpoint(tmp_path / "best_val" / "ckpt" / "best_model.pt")
    assert final["timesteps"] == best["timesteps"] == best_step
    assert all(torch.equal(t, final["policy"][n]) for n, t in best["policy"].items())
    step_state = load_checkpoint(run_dir / "ckpt" / f"checkpoint_step_{best_step}.pt", kind="rl")
    assert all(torch.equal(t, step_state["policy"][n]) for n, t in best["policy"].items())


def test_resume_keeps_the_best_policy_on_val(trained_run, tmp_path):
    run_dir, args, _ = trained_run
    base = [a for a in args if not a.startswith("paths.")] + ["training.eval_freq=500", "training.final_policy=best_val"]
    full = train_rl.main(base + [f"paths.checkpoint_dir={tmp_path / 'full'}", f"paths.log_dir={tmp_path / 'full_logs'}",
                                 "training.save_total_limit=10"])
    ckpt = tmp_path / "resumed"
    ckpt.mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint_step_1500.pt", ckpt)
    shutil.copy(tmp_path / "full" / TABLE_FILE, ckpt)
    write_latest_pointer(ckpt, ckpt / "checkpoint_step_1500.pt", 1500)
    train_rl.main(base + [f"paths.checkpoint_dir={ckpt}", f"paths.log_dir={tmp_path / 'resumed_logs'}", "--resume"])
    assert full["metrics"]["timesteps"] == 2000
    a = json.loads((tmp_path / "full" / "eval_metrics.json").read_text())["best_on_val"]
    b = json.loads((ckpt / "eval_metrics.json").read_text())["best_on_val"]
    assert a == b
    reference = load_checkpoint(tmp_path / "full" / "final_model.pt")["policy"]
    assert all(torch.equal(t, load_checkpoint(ckpt / "final_model.pt")["policy"][n]) for n, t in reference.items())


def test_best_val_without_evaluations_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "src.scripts.train_rl", "--config", "configs/rl_train.yaml", "training.final_policy=best_val",
         f"paths.checkpoint_dir={tmp_path / 'c'}", f"paths.log_dir={tmp_path / 'l'}"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "final_policy" in last and "eval_freq" in last


def test_synthetic_queries_are_reworded_with_the_index_embedding_model(rl_table, rl_rag_index, rl_data_dir, tmp_path):  # noqa: F811
    """The shipped synthetic settings (keep 0.2, substitute 1.0) reword queries with the index's
    own embedding model: many of a query's content words are not in its document any more
    (thinning alone leaves none), and a synthetic-only run trains and is judged on labeled val/test."""
    from src.data.readers import read_documents
    from src.rl.synthetic import STOPWORDS, WordNeighbors, synthetic_queries
    from src.rl.train import index_embedding_model

    assert index_embedding_model(rl_rag_index) == "sentence-transformers/all-MiniLM-L6-v2"
    docs = read_documents(rl_data_dir / "documents.jsonl")
    texts = {d.id: d.text.lower() for d in docs}
    neighbours = WordNeighbors.from_pretrained(index_embedding_model(rl_rag_index))

    def foreign_share(queries) -> float:
        words = [(w.lower().strip(".,;:!?()[]\"'"), next(iter(q.relevance))) for q in queries for w in q.query.split()]
        content = [(w, d) for w, d in words if w and w not in STOPWORDS]
        return sum(w not in texts[d] for w, d in content) / len(content)

    assert foreign_share(synthetic_queries(docs, "sentence", 0.2, 2, seed=0)) == 0.0
    assert foreign_share(synthetic_queries(docs, "sentence", 0.2, 2, seed=0, substitute=1.0, neighbours=neighbours)) > 0.3

    args = rl_run_args(tmp_path, "synthetic", **{"env.queries": "synthetic", "env.synthetic.max_queries": 60,
                                                 "training.total_timesteps": 500, "training.save_freq": 250})
    train_rl.main(args)
    metrics = json.loads((tmp_path / "synthetic" / "ckpt" / "eval_metrics.json").read_text())
    assert metrics["train_split"]["queries"] == 60  # synthetic only (max_queries); val and test are the labeled splits
    assert metrics["test_split"]["queries"] > 0 and 0.0 <= metrics["test_split"]["trained_mean_reward"] <= 1.0
