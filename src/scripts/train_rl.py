"""Train a PPO policy (stable-baselines3) on MARK's retrieval-policy environment or any Gymnasium env.

    python -m src.scripts.train_rl --config configs/rl_train.yaml [--resume]
        [--device cpu|cuda|auto] [key.sub=value ...]

Top to bottom: build the environment (``env.id: mark-retrieval``: score every retrieval
action on every query of ``data.eval_file`` over the RAG index in ``data.rag_index_dir``
once, cached beside the checkpoints, and split the queries into train / held-out; or
``gym.make(env.id)``); build PPO; with ``--resume``, restore the latest
``checkpoint_step_N.pt`` and continue to ``training.total_timesteps``; train, writing
``checkpoint_step_N.pt`` every ``training.save_freq`` timesteps; save ``final_model.pt``
(weights + observation normalisation, no SB3 needed to load it); reload it on its own and
evaluate it next to a random policy and every fixed strategy (held-out queries, or
``training.eval_episodes`` episodes); print the table and write ``eval_metrics.json`` and
``eval_metrics.png`` beside ``final_model.pt``. Logs go to ``paths.log_dir``
(``train.log``, ``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from src.core.checkpoint import atomic_write_json, find_latest_checkpoint, load_checkpoint, save_checkpoint
from src.core.cli import add_common_args, overrides_with_device, run_cli
from src.core.config import config_to_dict, load_config, save_config
from src.core.logging import MetricsLogger, setup_logging
from src.core.runtime import seed_everything
from src.rl.config import RLConfig
from src.rl.evaluation import evaluate_strategies, format_strategy_table, plot_strategy_comparison, retrieval_split_summary, summarize
from src.rl.policy import load_rl_policy
from src.rl.training import (
    CHECKPOINT_KIND,
    FINAL_MODEL_FILE,
    STEP_CHECKPOINT_PATTERN,
    TrainingMonitor,
    build_env_setup,
    build_ppo,
    build_vec_env,
    policy_state,
    restore_training_checkpoint,
    single_torch_thread,
)

DEFAULT_CONFIG = "configs/rl_train.yaml"
EVAL_METRICS_FILE = "eval_metrics.json"
EVAL_PLOT_FILE = "eval_metrics.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.scripts.train_rl", description=__doc__.split("\n\n")[0])
    # --evaluate is accepted for the orchestrator's common options; evaluation always runs.
    add_common_args(parser, DEFAULT_CONFIG, evaluate=True)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, RLConfig, overrides_with_device(args))
    return run(cfg, resume=args.resume, evaluate=args.evaluate)


def run(cfg: RLConfig, resume: bool = False, evaluate: bool = False) -> dict:
    """Train (or, with ``resume``, continue training) and evaluate the policy.

    ``evaluate`` is accepted for the common entry-point signature: evaluation always runs.
    Returns ``{"metrics": {timesteps, train_seconds, trained / random / best fixed mean
    reward, ...}, "outputs": {"final_model", "last_checkpoint", "eval_metrics", "eval_plot",
    "config", "train_log"}}``.
    """
    checkpoint_dir, log_dir = Path(cfg.paths.checkpoint_dir), Path(cfg.paths.log_dir)
    log = setup_logging("rl", log_dir)
    metrics_logger = MetricsLogger(log_dir, "rl", use_tensorboard=cfg.system.use_tensorboard, use_wandb=cfg.system.use_wandb,
                                   wandb_project=cfg.system.wandb_project, config=config_to_dict(cfg))
    seed_everything(cfg.system.seed)

    # 1. environments
    setup = build_env_setup(cfg)
    venv = build_vec_env(setup, cfg)

    # 2. PPO, restored from the latest step checkpoint with --resume
    model = build_ppo(cfg, venv)
    resumed_from = None
    if resume:
        resumed_from = find_latest_checkpoint(checkpoint_dir, STEP_CHECKPOINT_PATTERN)
        if resumed_from is None:
            log.info("--resume: no checkpoint in %s yet, training from scratch", checkpoint_dir)
        else:
            state = load_checkpoint(resumed_from, kind=CHECKPOINT_KIND)
            restore_training_checkpoint(state, resumed_from, cfg, model, venv, setup.env_info)
            log.info("resumed from %s at timestep %d", resumed_from, model.num_timesteps)
    save_config(cfg, checkpoint_dir / "config.yaml")

    # 3. train
    total = cfg.training.total_timesteps
    log.info("PPO on %s: %d timesteps, %d envs x %d steps per rollout, policy MLP %d x %d (%s), device %s",
             cfg.env.id, total, cfg.training.n_envs, cfg.training.n_steps, cfg.model.n_layers, cfg.model.hidden_dim,
             cfg.model.activation, model.device)
    monitor = TrainingMonitor(cfg, venv, setup.env_info, metrics_logger, total)
    started = time.perf_counter()
    with single_torch_thread():
        model.learn(total_timesteps=max(0, total - model.num_timesteps), callback=monitor, log_interval=1,
                    reset_num_timesteps=resumed_from is None)
    train_seconds = time.perf_counter() - started
    final_path = save_checkpoint(policy_state(cfg, model, venv, setup.env_info), checkpoint_dir / FINAL_MODEL_FILE)
    log.info("trained to timestep %d in %.1fs -> %s", model.num_timesteps, train_seconds, final_path)
    venv.close()

    # 4. evaluate the saved policy, loaded on its own as the API would
    policy = load_rl_policy(final_path)
    with single_torch_thread():
        results = evaluate_strategies(policy, setup.make_eval_env, setup.eval_episodes, cfg.system.seed + 1_000_000,
                                      reseed=not cfg.is_retrieval_env)
    summary = summarize(results)
    where = f"{setup.eval_episodes} held-out queries" if cfg.is_retrieval_env else f"{setup.eval_episodes} episodes"
    table = format_strategy_table(results)
    print(f"\nPPO policy vs baselines on {cfg.env.id} ({where}, after {model.num_timesteps} timesteps)\n{table}\n")
    log.info("evaluation on %s:\n%s", where, table)
    report = {"env": cfg.env.id, "timesteps": int(model.num_timesteps), "evaluated_on": where, "strategies": results, "summary": summary}
    if cfg.is_retrieval_env:
        report["train_split"] = retrieval_split_summary(policy, setup.table, setup.train_query_ids,
                                                        cfg.env.cost_per_extra_doc, setup.observation)
    if "best_fixed" in summary:
        verdict = "matches or beats" if summary["trained_beats_best_fixed"] else "is below"
        log.info("trained policy (%.4f) %s the best fixed strategy %s (%.4f) by %+.4f", summary["trained_mean_reward"], verdict,
                 summary["best_fixed"], summary["best_fixed_mean_reward"], summary["trained_minus_best_fixed"])
    eval_path = atomic_write_json(checkpoint_dir / EVAL_METRICS_FILE, report)
    plot_path = plot_strategy_comparison(results, checkpoint_dir / EVAL_PLOT_FILE, f"{cfg.env.id}: {where}")
    metrics_logger.log_metrics({f"{name}/{key}": value for name, r in results.items() for key, value in r.items()},
                               step=model.num_timesteps, kind="eval")
    metrics_logger.close()

    metrics = {"timesteps": int(model.num_timesteps), "train_seconds": round(train_seconds, 1), **summary}
    for key in ("mean_ndcg", "mean_k"):
        if key in results["trained"]:
            metrics[f"trained_{key}"] = results["trained"][key]
    outputs = {"final_model": str(final_path), "eval_metrics": str(eval_path), "eval_plot": str(plot_path),
               "config": str(checkpoint_dir / "config.yaml"), "train_log": str(log_dir / "train.log")}
    last = monitor.last_checkpoint or find_latest_checkpoint(checkpoint_dir, STEP_CHECKPOINT_PATTERN)
    if last is not None:
        outputs["last_checkpoint"] = str(last)
    return {"metrics": metrics, "outputs": outputs}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
