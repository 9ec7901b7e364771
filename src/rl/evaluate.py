"""Evaluate a trained policy next to baselines on the same episodes, print and plot it.

Strategies compared (each on a fresh evaluation environment, facing the same episodes):

* ``trained``: the saved policy (``final_model.pt`` through :func:`~src.rl.load.load_rl_policy`),
  its most likely action;
* ``random``: a uniformly random action (seeded);
* ``fixed <action>``: always the same action, one row per action of a Discrete space
  (on the retrieval env: each ``mode@k`` retrieval strategy);
* ``oracle``: the best action in hindsight, where the environment can tell
  (the retrieval env): an upper bound, not a policy.

On the retrieval env the episodes are the held-out queries, each once; otherwise
``eval_episodes`` episodes seeded ``seed, seed + 1, ...``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from src.rl.model import RLPolicy

Chooser = Callable[[gym.Env, np.ndarray], Any]
MAX_FIXED_ACTIONS = 32


def run_episodes(make_env: Callable[[], gym.Env], choose: Chooser, episodes: int, seed: int, reseed: bool) -> dict[str, float]:
    """Play ``episodes`` episodes with ``choose(env, obs) -> action``; returns the mean and std
    of the episode reward, the mean length, and the means of ``ndcg`` / ``k`` /
    ``num_retrieved`` over steps when the environment reports them.

    ``reseed``: reset episode ``i`` with seed ``seed + i`` (same start states for every
    strategy); otherwise the environment's own sequence (the held-out queries in order).
    """
    env = make_env()
    returns, lengths, extras = [], [], {"ndcg": [], "k": [], "num_retrieved": []}
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode) if reseed else env.reset()
            total, length, done = 0.0, 0, False
            while not done:
                obs, reward, terminated, truncated, info = env.step(choose(env, obs))
                total, length, done = total + float(reward), length + 1, terminated or truncated
                for key in extras:
                    if key in info:
                        extras[key].append(float(info[key]))
            returns.append(total)
            lengths.append(length)
    finally:
        env.close()
    result = {"mean_reward": float(np.mean(returns)), "std_reward": float(np.std(returns)),
              "mean_length": float(np.mean(lengths)), "episodes": episodes}
    names = {"ndcg": "mean_ndcg", "k": "mean_k", "num_retrieved": "mean_docs"}
    result.update({names[key]: float(np.mean(values)) for key, values in extras.items() if values})
    return result


def baseline_choosers(env: gym.Env, seed: int) -> dict[str, Chooser]:
    """``random``, one ``fixed <action>`` per action of a (small) Discrete space, and
    ``oracle`` where the environment offers ``best_action()``."""
    space = copy.deepcopy(env.action_space)
    space.seed(seed)
    choosers: dict[str, Chooser] = {"random": lambda env, obs: space.sample()}
    if isinstance(space, gym.spaces.Discrete) and space.n <= MAX_FIXED_ACTIONS:
        label = getattr(env.unwrapped, "action_label", lambda a: f"action={a}")
        for action in range(int(space.n)):
            choosers[f"fixed {label(action)}"] = lambda env, obs, action=action: action
    if hasattr(env.unwrapped, "best_action"):
        choosers["oracle"] = lambda env, obs: env.unwrapped.best_action()
    return choosers


def evaluate_strategies(policy: RLPolicy, make_env: Callable[[], gym.Env], episodes: int, seed: int, reseed: bool) -> dict[str, dict[str, float]]:
    """:func:`run_episodes` of the trained policy and every baseline, ``{name: results}``."""
    probe = make_env()
    choosers: dict[str, Chooser] = {"trained": lambda env, obs: policy.act(obs)}
    choosers.update(baseline_choosers(probe, seed))
    probe.close()
    return {name: run_episodes(make_env, choose, episodes, seed, reseed) for name, choose in choosers.items()}


def summarize(results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The best fixed strategy and whether the trained policy matched it (mean reward)."""
    fixed = {name: r for name, r in results.items() if name.startswith("fixed ")}
    summary: dict[str, Any] = {"trained_mean_reward": results["trained"]["mean_reward"], "random_mean_reward": results["random"]["mean_reward"]}
    if fixed:
        best = max(fixed, key=lambda name: fixed[name]["mean_reward"])
        summary.update({
            "best_fixed": best.removeprefix("fixed "),
            "best_fixed_mean_reward": fixed[best]["mean_reward"],
            "trained_minus_best_fixed": results["trained"]["mean_reward"] - fixed[best]["mean_reward"],
            "trained_beats_best_fixed": results["trained"]["mean_reward"] >= fixed[best]["mean_reward"],
        })
    return summary


def format_strategy_table(results: dict[str, dict[str, float]]) -> str:
    """A text table, one row per strategy (best mean reward first; trained and random on top)."""
    columns = [("mean_reward", "reward"), ("std_reward", "std"), ("mean_ndcg", "nDCG"), ("mean_k", "k"), ("mean_docs", "docs"), ("mean_length", "length")]
    columns = [(key, title) for key, title in columns if any(key in r for r in results.values())]
    if any("mean_ndcg" in r for r in results.values()):
        columns = [c for c in columns if c[0] != "mean_length"]  # always 1 on the retrieval env
    order = ["trained", "random"] + sorted((n for n in results if n not in ("trained", "random")), key=lambda n: -results[n]["mean_reward"])
    width = max(len(n) for n in order) + 2
    header = "strategy".ljust(width) + "".join(title.rjust(9) for _, title in columns)
    lines = [header, "-" * len(header)]
    for name in order:
        lines.append(name.ljust(width) + "".join(f"{results[name][key]:9.4f}" if key in results[name] else " " * 9 for key, _ in columns))
    return "\n".join(lines)


def plot_strategy_comparison(results: dict[str, dict[str, float]], path: str | Path, title: str) -> Path:
    """Bar charts of mean reward (and nDCG and k where reported), one bar per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title_) for key, title_ in (("mean_reward", "mean reward"), ("mean_ndcg", "mean nDCG"), ("mean_k", "mean k"))
              if all(key in r for r in results.values())]
    names = ["trained", "random"] + sorted((n for n in results if n not in ("trained", "random")), key=lambda n: -results[n]["mean_reward"])
    colors = ["tab:green" if n == "trained" else "tab:gray" if n == "random" else "tab:purple" if n == "oracle" else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 0.45 * len(names) + 2) * len(panels) / 1.6, 4.2), squeeze=False)
    for ax, (key, panel_title) in zip(axes[0], panels):
        values = [results[n][key] for n in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.axhline(results["trained"][key], color="tab:green", linestyle="--", linewidth=1)  # compare every bar with it
        ax.set_xticks(range(len(names)), [n.removeprefix("fixed ") for n in names], rotation=70, fontsize=8)
        ax.set_title(panel_title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def retrieval_split_summary(policy: RLPolicy, table: Any, query_ids: np.ndarray, cost_per_extra_doc: float, observation: Any) -> dict[str, Any]:
    """On the queries ``query_ids`` of a :class:`~src.rl.retrieval_env.RetrievalTable`: the
    trained policy's mean reward, the best fixed strategy's (label and mean reward) and the
    oracle's. Used on the training split, to tell fitting from generalising. ``observation``
    is the environment's :class:`~src.rl.retrieval_env.QueryObservation`."""
    rewards = table.rewards(cost_per_extra_doc)[query_ids]
    observations = observation(table.embeddings[query_ids], table.signals[query_ids])
    chosen = np.asarray(policy.act(observations), dtype=np.int64).reshape(-1)
    fixed_means = rewards.mean(axis=0)
    best = int(np.argmax(fixed_means))
    return {
        "queries": int(len(query_ids)),
        "trained_mean_reward": float(rewards[np.arange(len(query_ids)), chosen].mean()),
        "best_fixed": table.actions[best].label,
        "best_fixed_mean_reward": float(fixed_means[best]),
        "oracle_mean_reward": float(rewards.max(axis=1).mean()),
    }
