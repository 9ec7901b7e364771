"""The RL recipe: PPO (stable-baselines3) on MARK's retrieval-policy environment or any Gymnasium env.

:func:`run` reads top to bottom: build the environment (``env.id: mark-retrieval``: score
every retrieval action on every query of ``data.eval_file`` over the RAG index in
``data.rag_index_dir`` once, cached beside the checkpoints, and split the queries into
train / held-out; or ``gym.make(env.id)``); build PPO; with ``resume``, restore the latest
``checkpoint_step_N.pt`` and continue to ``training.total_timesteps``; train, writing
``checkpoint_step_N.pt`` every ``training.save_freq`` timesteps; save ``final_model.pt``
(weights + observation normalisation, no SB3 needed to load it); reload it on its own and
evaluate it next to a random policy and every fixed strategy; write ``eval_metrics.json``
and ``eval_metrics.png`` beside ``final_model.pt``. Run it with ``python -m src.scripts.train_rl``.

PPO itself is stable-baselines3's. What MARK adds around it:

* :func:`build_env_setup`: the retrieval-policy environment (train / held-out query split
  over a precomputed :class:`~src.rl.retrieval_env.RetrievalTable`) or any registered
  Gymnasium id; :func:`build_vec_env` vectorises it (Monitor for episode stats, optional
  ``VecNormalize`` observation normalisation).
* :func:`build_ppo`: PPO with an MLP actor-critic sized by ``model`` and the
  hyperparameters of ``training``.
* Checkpoints in MARK's own format (``torch.save`` of tensors and plain values, loadable
  with ``weights_only=True``), not SB3's zip: :func:`save_training_checkpoint` /
  :func:`restore_training_checkpoint` hold the policy, the optimizer, the timestep and
  update counters, the observation statistics, the last observation, the environments'
  positions and every RNG, taken at a rollout boundary. Resuming the retrieval
  environment continues exactly as if never stopped; other Gymnasium environments start
  fresh episodes (their internal state is not saved).
* :class:`TrainingMonitor`: the SB3 callback that shows the progress bar, logs metrics
  and writes ``checkpoint_step_N.pt`` every ``training.save_freq`` timesteps.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gymnasium as gym
import numpy as np
import torch
import yaml
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize
from torch import nn
from tqdm.auto import tqdm

from src.core.checkpoint import (
    atomic_write_json,
    find_latest_checkpoint,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    write_latest_pointer,
)
from src.core.config import config_to_dict, save_config
from src.core.errors import CheckpointError, ConfigError, DataError
from src.core.logging import MetricsLogger, get_logger, setup_logging
from src.core.runtime import capture_rng_state, resolve_device, restore_rng_state, seed_everything
from src.rl.config import RLConfig
from src.rl.evaluate import evaluate_strategies, format_strategy_table, plot_strategy_comparison, retrieval_split_summary, run_episodes, summarize
from src.rl.load import POLICY_KIND, load_rl_policy, policy_from_state
from src.data.readers import read_documents
from src.rl.retrieval_env import (
    SIGNAL_NAMES,
    QueryObservation,
    RetrievalPolicyEnv,
    RetrievalTable,
    action_table,
    load_or_build_retrieval_table,
    split_queries,
    split_test_queries,
)
from src.rag.store import ChunkStore
from src.rl.synthetic import MAX_SENTENCE_WORDS, MIN_SENTENCE_WORDS, WordNeighbors, synthetic_queries

CHECKPOINT_KIND = "rl"
FINAL_MODEL_FILE = "final_model.pt"
BEST_MODEL_FILE = "best_model.pt"  # training.eval_freq: the policy with the best val reward
STEP_CHECKPOINT_PATTERN = "checkpoint_step_*.pt"
EVAL_METRICS_FILE = "eval_metrics.json"
EVAL_PLOT_FILE = "eval_metrics.png"

log = get_logger("rl")


# --------------------------------------------------------------------------- environments
@dataclass
class EnvSetup:
    """How to make the training and evaluation environments of a config.

    ``make_train_env(rank)`` is one of ``n_envs`` training copies; ``make_eval_env()`` the
    evaluation environment (held-out queries for the retrieval env), run for
    ``eval_episodes`` episodes. ``env_info`` describes the environment for the saved policy.
    """

    make_train_env: Callable[[int], gym.Env]
    make_eval_env: Callable[[], gym.Env]
    eval_episodes: int
    env_info: dict[str, Any]
    table: RetrievalTable | None = None
    observation: QueryObservation | None = None
    train_query_ids: np.ndarray | None = None
    heldout_query_ids: np.ndarray | None = None
    test_query_ids: np.ndarray | None = None
    make_test_env: Callable[[], gym.Env] | None = None


def build_env_setup(cfg: RLConfig) -> EnvSetup:
    """The environments of ``cfg.env``: MARK's retrieval env or a registered Gymnasium id."""
    if cfg.is_retrieval_env:
        return _retrieval_env_setup(cfg)
    return _gym_env_setup(cfg)


def index_embedding_model(index_dir: str | Path) -> str:
    """The embedding model a saved RAG index was built with (its store's settings; a missing or
    broken index is the store's one-line error)."""
    store = ChunkStore.open(index_dir)
    try:
        return str(store.settings["embedding_model"])
    finally:
        store.close()


def synthetic_documents_file(cfg: RLConfig) -> Path:
    """The documents synthetic queries are made from: ``data.documents_file``, else the
    ``data.documents_file`` the RAG index was built from (its saved ``config.yaml``)."""
    if cfg.data.documents_file is not None:
        path = Path(cfg.data.documents_file)
    else:
        index_config = Path(cfg.data.rag_index_dir) / "config.yaml"
        raw = yaml.safe_load(index_config.read_text()) if index_config.is_file() else None
        found = ((raw or {}).get("data") or {}).get("documents_file")
        if not found:
            raise ConfigError(f"data.documents_file: not set, and {index_config} names no data.documents_file to make synthetic queries from")
        path = Path(found)
    if not path.is_file():
        raise ConfigError(f"data.documents_file: {path} not found (env.queries: {cfg.env.queries} makes queries from it)")
    return path


def split_retrieval_queries(table: RetrievalTable, queries: str, heldout_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, val, test)`` row ids of ``table``. The labeled rows are split first: a fixed
    test split (the same for every seed and every ``queries`` setting), then a seeded val
    split of the rest. ``queries`` says what trains: the remaining labeled rows
    (``labeled``), the synthetic rows (``synthetic``) or both. Val and test are labeled only."""
    labeled = np.flatnonzero(~table.synthetic)
    rest, test = split_test_queries(len(labeled), test_fraction)
    train_pos, heldout_pos = split_queries(len(rest), heldout_fraction, seed)
    train = labeled[rest[train_pos]] if queries != "synthetic" else np.zeros(0, dtype=np.int64)
    if queries != "labeled":
        train = np.sort(np.concatenate([train, np.flatnonzero(table.synthetic)]))
    return train, labeled[rest[heldout_pos]], labeled[test]


def _retrieval_env_setup(cfg: RLConfig) -> EnvSetup:
    env_cfg = cfg.env
    actions = action_table(env_cfg.modes, env_cfg.k_choices)
    synthetic = []
    if env_cfg.queries != "labeled":
        syn = env_cfg.synthetic
        neighbours = WordNeighbors.from_pretrained(index_embedding_model(cfg.data.rag_index_dir)) if syn.substitute > 0 else None
        synthetic = synthetic_queries(read_documents(synthetic_documents_file(cfg)), syn.source, syn.keep_shared,
                                      syn.per_document, cfg.system.seed if syn.seed is None else syn.seed, syn.max_queries,
                                      syn.substitute, neighbours)
        if not synthetic:
            raise DataError(
                f"env.synthetic.source={syn.source}: no document of {synthetic_documents_file(cfg)} gives a query of 2 or more "
                f"words ({'its title or first line' if syn.source == 'title' else f'sentences of {MIN_SENTENCE_WORDS} to {MAX_SENTENCE_WORDS} words'}); try another source"
            )
    table = load_or_build_retrieval_table(
        cfg.data.rag_index_dir,
        cfg.data.eval_file,
        actions,
        cache_dir=cfg.paths.checkpoint_dir if env_cfg.cache_tables else None,
        beir_split=cfg.data.beir_split,
        device=cfg.system.device,
        show_progress=cfg.training.show_progress,
        synthetic=synthetic,
    )
    # The test split first, fixed for every seed; then train / val (held-out) from the rest.
    train_ids, heldout_ids, test_ids = split_retrieval_queries(table, env_cfg.queries, env_cfg.heldout_fraction,
                                                               env_cfg.test_fraction, cfg.system.seed)
    # Fit on the training queries only: the held-out ones stay unseen.
    observation = QueryObservation.fit(table.embeddings[train_ids], env_cfg.query_embedding_dims)
    options = dict(cost_per_extra_doc=env_cfg.cost_per_extra_doc, observation=observation)
    env_info = {
        "id": env_cfg.id,
        "actions": [[a.mode, a.k] for a in actions],
        "signal_names": list(SIGNAL_NAMES),
        "query_embedding_dims": env_cfg.query_embedding_dims,
        "observation": observation.to_state(),
        "embedding_dim": int(table.embeddings.shape[1]),
        "cost_per_extra_doc": env_cfg.cost_per_extra_doc,
        "corpus_checksum": table.corpus_checksum,
        "table_key": table.key,
        "num_train_queries": int(len(train_ids)),
        "num_heldout_queries": int(len(heldout_ids)),
        "num_test_queries": int(len(test_ids)),
        "queries": env_cfg.queries,
        "num_synthetic_train_queries": int(table.synthetic[train_ids].sum()),
    }
    log.info("retrieval env: %d actions (%s), %d train / %d val (held-out) / %d test queries",
             len(actions), ", ".join(a.label for a in actions), len(train_ids), len(heldout_ids), len(test_ids))
    return EnvSetup(
        make_train_env=lambda rank: RetrievalPolicyEnv(table, train_ids, shuffle=True, **options),
        make_eval_env=lambda: RetrievalPolicyEnv(table, heldout_ids, shuffle=False, **options),
        eval_episodes=len(heldout_ids),
        env_info=env_info,
        table=table,
        observation=observation,
        train_query_ids=train_ids,
        heldout_query_ids=heldout_ids,
        test_query_ids=test_ids,
        make_test_env=(lambda: RetrievalPolicyEnv(table, test_ids, shuffle=False, **options)) if len(test_ids) else None,
    )


def _make_gym_env(env_id: str) -> gym.Env:
    try:
        return gym.make(env_id)
    except gym.error.Error as err:
        raise ConfigError(f"env.id: '{env_id}' is not a registered Gymnasium environment ({err})") from None


def _gym_env_setup(cfg: RLConfig) -> EnvSetup:
    probe = _make_gym_env(cfg.env.id)
    obs_space, act_space = probe.observation_space, probe.action_space
    probe.close()
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError(f"env.id: '{cfg.env.id}' has a {type(obs_space).__name__} observation space; MARK's PPO takes Box observations")
    if not isinstance(act_space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise ConfigError(f"env.id: '{cfg.env.id}' has a {type(act_space).__name__} action space; MARK's PPO takes Discrete or Box actions")
    return EnvSetup(
        make_train_env=lambda rank: _make_gym_env(cfg.env.id),
        make_eval_env=lambda: _make_gym_env(cfg.env.id),
        eval_episodes=cfg.training.eval_episodes,
        env_info={"id": cfg.env.id},
    )


def test_split_report(results: dict[str, dict[str, float]], val_summary: dict[str, Any], queries: int) -> dict[str, Any]:
    """The test split's numbers: the trained policy, the best fixed strategy **chosen on the val
    split** (``val_summary["best_fixed"]``) and the oracle, each measured on the test queries."""
    fixed = val_summary.get("best_fixed")
    out: dict[str, Any] = {
        "queries": queries,
        "trained_mean_reward": results["trained"]["mean_reward"],
        "oracle_mean_reward": results["oracle"]["mean_reward"] if "oracle" in results else None,
        "strategies": results,
    }
    if fixed is not None and f"fixed {fixed}" in results:
        reward = results[f"fixed {fixed}"]["mean_reward"]
        out.update({"best_fixed": fixed, "best_fixed_mean_reward": reward, "trained_minus_best_fixed": out["trained_mean_reward"] - reward})
    return out


def build_vec_env(setup: EnvSetup, cfg: RLConfig) -> VecEnv:
    """``n_envs`` training environments in one process, each in a ``Monitor`` (episode
    returns), seeded ``seed + rank``; wrapped in ``VecNormalize`` when observations are normalised."""
    venv: VecEnv = DummyVecEnv([(lambda rank=rank: Monitor(setup.make_train_env(rank))) for rank in range(cfg.training.n_envs)])
    venv.seed(cfg.system.seed)
    if cfg.training.normalize_observations:
        venv = VecNormalize(venv, norm_obs=True, norm_reward=False, gamma=cfg.training.gamma)
    return venv


# --------------------------------------------------------------------------- the model
@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the previous count.

    PPO's networks and minibatches are tiny: splitting each matmul over threads costs more
    in synchronisation than it saves, and on a busy machine it collapses (measured: 10k
    timesteps of the retrieval env in 14 s on one thread, 157 s on two, 2 shared cores).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _schedule(value: float, kind: str):
    # Zoo's ``lin_<value>``: value * progress_remaining, from value at the start to 0 at the end.
    return LinearSchedule(value, 0.0, 1.0) if kind == "linear" else value


def build_ppo(cfg: RLConfig, venv: VecEnv) -> PPO:
    """stable-baselines3 PPO with an MLP actor-critic (``model.n_layers`` x ``model.hidden_dim``
    for each of policy and value) on ``venv``, seeded with ``system.seed``."""
    t = cfg.training
    if t.n_steps * t.n_envs < 2:
        raise ConfigError("training.n_steps * training.n_envs must be at least 2 (PPO's rollout)")
    if t.batch_size > t.n_steps * t.n_envs:
        raise ConfigError(f"training.batch_size ({t.batch_size}) is larger than a rollout (n_steps * n_envs = {t.n_steps * t.n_envs})")
    hidden = [cfg.model.hidden_dim] * cfg.model.n_layers
    model = PPO(
        "MlpPolicy",
        venv,
        learning_rate=_schedule(t.learning_rate, t.lr_schedule),
        n_steps=t.n_steps,
        batch_size=t.batch_size,
        n_epochs=t.n_epochs,
        gamma=t.gamma,
        gae_lambda=t.gae_lambda,
        clip_range=_schedule(t.clip_range, t.clip_range_schedule),
        ent_coef=t.ent_coef,
        vf_coef=t.vf_coef,
        max_grad_norm=t.max_grad_norm,
        policy_kwargs={"net_arch": {"pi": hidden, "vf": hidden}, "activation_fn": {"tanh": nn.Tanh, "relu": nn.ReLU}[cfg.model.activation]},
        seed=cfg.system.seed,
        device=resolve_device(cfg.system.device),
        verbose=0,
    )
    # SB3 records its training statistics here; TrainingMonitor reads them, nothing is printed.
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def policy_architecture(cfg: RLConfig, model: PPO) -> dict[str, Any]:
    """What :class:`~src.rl.model.RLPolicy` needs to rebuild the network."""
    act_space = model.action_space
    if isinstance(act_space, gym.spaces.Discrete):
        space = {"type": "discrete", "n": int(act_space.n)}
    else:
        space = {"type": "box", "shape": list(act_space.shape), "low": act_space.low.reshape(-1).tolist(), "high": act_space.high.reshape(-1).tolist()}
    return {
        "obs_dim": int(np.prod(model.observation_space.shape)),
        "action_space": space,
        "hidden_dim": cfg.model.hidden_dim,
        "n_layers": cfg.model.n_layers,
        "activation": cfg.model.activation,
    }


def _obs_normalization(venv: VecEnv) -> dict[str, Any] | None:
    if not isinstance(venv, VecNormalize):
        return None
    rms = venv.obs_rms
    return {"mean": torch.from_numpy(np.asarray(rms.mean, dtype=np.float64)), "var": torch.from_numpy(np.asarray(rms.var, dtype=np.float64)),
            "count": float(rms.count), "epsilon": float(venv.epsilon), "clip_obs": float(venv.clip_obs)}


def policy_state(cfg: RLConfig, model: PPO, venv: VecEnv, env_info: dict) -> dict[str, Any]:
    """``final_model.pt``: the policy weights, architecture, observation normalisation,
    environment description, config and timesteps; loadable by :func:`~src.rl.load.load_rl_policy`."""
    return {
        "kind": POLICY_KIND,
        "policy": {k: v.detach().cpu().clone() for k, v in model.policy.state_dict().items()},
        "architecture": policy_architecture(cfg, model),
        "obs_normalization": _obs_normalization(venv),
        "env_info": env_info,
        "timesteps": int(model.num_timesteps),
        "config": config_to_dict(cfg),
    }


# --------------------------------------------------------------------------- checkpoints
def step_checkpoint_path(checkpoint_dir: Path, timesteps: int) -> Path:
    return Path(checkpoint_dir) / f"checkpoint_step_{timesteps}.pt"


def save_training_checkpoint(cfg: RLConfig, model: PPO, venv: VecEnv, env_info: dict, best: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoint_step_<timesteps>.pt`` (everything needed to resume exactly, with the
    best policy on val so far), point ``latest.json`` at it and keep the newest
    ``training.save_total_limit`` of them."""
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    state = policy_state(cfg, model, venv, env_info)
    inner = venv.venv if isinstance(venv, VecNormalize) else venv
    state.update({
        "kind": CHECKPOINT_KIND,
        "step": int(model.num_timesteps),
        "optimizer": model.policy.optimizer.state_dict(),
        "n_updates": int(model._n_updates),
        "episode_num": int(model._episode_num),
        "last_obs": torch.from_numpy(np.asarray(model._last_obs)) if model._last_obs is not None else None,
        "last_episode_starts": torch.from_numpy(np.asarray(model._last_episode_starts, dtype=bool)),
        "env_states": inner.env_method("get_state") if cfg.is_retrieval_env else None,
        "rng": capture_rng_state(),
        "best_on_val": best,
    })
    path = save_checkpoint(state, step_checkpoint_path(checkpoint_dir, model.num_timesteps))
    write_latest_pointer(checkpoint_dir, path, model.num_timesteps)
    _prune_step_checkpoints(checkpoint_dir, cfg.training.save_total_limit)
    return path


def _prune_step_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    def step_of(path: Path) -> int:
        match = re.search(r"checkpoint_step_(\d+)\.pt$", path.name)
        return int(match.group(1)) if match else -1

    for old in sorted(checkpoint_dir.glob(STEP_CHECKPOINT_PATTERN), key=step_of)[:-keep]:
        old.unlink(missing_ok=True)


def restore_training_checkpoint(state: dict, path: Path, cfg: RLConfig, model: PPO, venv: VecEnv, env_info: dict) -> None:
    """Put ``model`` and ``venv`` back where ``checkpoint_step_N.pt`` left them.

    A checkpoint of another environment, action set, query split or network is a
    ``CheckpointError`` naming the file.
    """
    saved_env = state.get("env_info") or {}
    for key in ("id", "actions", "query_embedding_dims", "table_key", "num_train_queries"):
        if saved_env.get(key) != env_info.get(key):
            what = "retrieval table (index or queries rebuilt)" if key == "table_key" else f"env {key}"
            raise CheckpointError(
                f"{path}: was trained with another {what} than the config now gives; "
                "use another paths.checkpoint_dir or drop --resume"
            )
    if state.get("architecture") != policy_architecture(cfg, model):
        raise CheckpointError(f"{path}: its policy network {state.get('architecture')} differs from the config's; drop --resume")
    load_state_dict_checked(model.policy, state["policy"], path)
    model.policy.optimizer.load_state_dict(state["optimizer"])
    model.num_timesteps = int(state["step"])
    model._n_updates = int(state["n_updates"])
    model._episode_num = int(state["episode_num"])
    norm = state.get("obs_normalization")
    if isinstance(venv, VecNormalize):
        if norm is None:
            raise CheckpointError(f"{path}: was trained without observation normalisation; training.normalize_observations is now on")
        venv.obs_rms.mean, venv.obs_rms.var = norm["mean"].numpy().copy(), norm["var"].numpy().copy()
        venv.obs_rms.count = norm["count"]
    elif norm is not None:
        raise CheckpointError(f"{path}: was trained with observation normalisation; training.normalize_observations is now off")
    inner = venv.venv if isinstance(venv, VecNormalize) else venv
    env_states = state.get("env_states")
    if env_states is not None and len(env_states) == inner.num_envs and state.get("last_obs") is not None:
        for rank, env_state in enumerate(env_states):
            inner.env_method("set_state", env_state, indices=[rank])
        inner.set_attr("needs_reset", False)  # the Monitor wrappers: their episode is under way, not over
        model._last_obs = state["last_obs"].numpy().copy()
        model._last_episode_starts = state["last_episode_starts"].numpy().copy()
    else:
        # Environments whose state is not saved start fresh episodes, on other seeds than at the start.
        model._last_obs = None
        venv.seed(cfg.system.seed + model.num_timesteps)
    restore_rng_state(state["rng"])


# --------------------------------------------------------------------------- the callback
@dataclass
class _RolloutStats:
    episodes: int = 0
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    ndcg: list[float] = field(default_factory=list)
    k: list[int] = field(default_factory=list)


class TrainingMonitor(BaseCallback):
    """Progress bar, metrics after every PPO update, and step checkpoints.

    After each update (SB3 calls ``on_rollout_start`` right after ``train()``, and
    ``on_training_end`` after the last one) it logs the update's losses and the rollout's
    episode returns (and nDCG / k on the retrieval env) to ``metrics.jsonl``, and saves
    ``checkpoint_step_N.pt`` when ``save_freq`` timesteps have passed since the last one;
    the last update always gets one.
    """

    def __init__(self, cfg: RLConfig, venv: VecEnv, setup: EnvSetup, metrics_logger: MetricsLogger, total_timesteps: int,
                 best: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.venv = venv
        self.setup = setup
        self.env_info = setup.env_info
        self.metrics_logger = metrics_logger
        self.total_timesteps = total_timesteps
        self.best = best  # {"val_mean_reward", "timesteps", "state"} of the best policy on val (training.eval_freq)
        self.stats = _RolloutStats()
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None

    def _on_training_start(self) -> None:
        self._updates_seen = self.model._n_updates
        self._updates_logged = 0
        self._saved_at = self.model.num_timesteps
        self._evaluated_at = self.model.num_timesteps
        self._started = time.perf_counter()
        self._start_steps = self.model.num_timesteps
        rollout = self.cfg.training.n_steps * self.cfg.training.n_envs
        updates_left = max(1, -(-(self.total_timesteps - self.model.num_timesteps) // rollout))
        self._log_every = max(1, updates_left // 20)  # about 20 lines in train.log
        self._bar = tqdm(total=self.total_timesteps, initial=self.model.num_timesteps, desc="PPO", unit="step",
                         disable=not self.cfg.training.show_progress, dynamic_ncols=True)

    def _on_step(self) -> bool:
        self._bar.update(self.training_env.num_envs)
        for info in self.locals["infos"]:
            episode = info.get("episode")
            if episode is not None:
                self.stats.episodes += 1
                self.stats.returns.append(float(episode["r"]))
                self.stats.lengths.append(int(episode["l"]))
            if "ndcg" in info:
                self.stats.ndcg.append(info["ndcg"])
                self.stats.k.append(info["k"])
        return True

    def _on_rollout_start(self) -> None:
        self._after_update()

    def _on_training_end(self) -> None:
        self._after_update(final=True)
        self._bar.close()

    def _after_update(self, final: bool = False) -> None:
        steps = self.model.num_timesteps
        if self.model._n_updates > self._updates_seen:  # SB3 counts n_epochs per update
            self._updates_seen = self.model._n_updates
            self._updates_logged += 1
            self._log_update(steps, final)
        eval_freq = self.cfg.training.eval_freq
        if eval_freq and steps > self._evaluated_at and (final or steps // eval_freq > self._evaluated_at // eval_freq):
            self._evaluate_on_val(steps)
            self._evaluated_at = steps
        save_freq = self.cfg.training.save_freq
        if steps > self._saved_at and (final or steps // save_freq > self._saved_at // save_freq):
            self.last_checkpoint = save_training_checkpoint(self.cfg, self.model, self.venv, self.env_info, self.best)
            self._saved_at = steps

    def _evaluate_on_val(self, steps: int) -> None:
        """The current policy, played deterministically on the val split (every held-out query of
        the retrieval env; ``eval_episodes`` seeded episodes of a Gymnasium env); the best so far
        is kept for ``best_model.pt``."""
        rng = capture_rng_state()  # building the policy draws initial weights: training must not see that
        state = policy_state(self.cfg, self.model, self.venv, self.env_info)
        policy = policy_from_state(state)
        setup = self.setup
        with torch.no_grad():
            result = run_episodes(setup.make_eval_env, lambda env, obs: policy.act(obs), setup.eval_episodes,
                                  self.cfg.system.seed + 1_000_000, reseed=not self.cfg.is_retrieval_env)
        restore_rng_state(rng)
        reward = result["mean_reward"]
        improved = self.best is None or reward > self.best["val_mean_reward"]
        if improved:
            self.best = {"val_mean_reward": reward, "timesteps": steps, "state": state}
        self.metrics_logger.log_metrics({"val_mean_reward": reward, "best_val_mean_reward": self.best["val_mean_reward"]},
                                        step=steps, kind="eval")
        log.debug("timesteps %d: val mean reward %.4f%s", steps, reward, " (best so far)" if improved else "")

    def _log_update(self, steps: int, final: bool) -> None:
        s, values = self.stats, self.model.logger.name_to_value
        elapsed = time.perf_counter() - self._started
        metrics: dict[str, Any] = {"timesteps": steps, "episodes": s.episodes,
                                   "steps_per_second": round((steps - self._start_steps) / elapsed, 1) if elapsed > 0 else 0.0}
        if s.returns:
            metrics["episode_reward_mean"] = float(np.mean(s.returns))
            metrics["episode_length_mean"] = float(np.mean(s.lengths))
        if s.ndcg:
            metrics["ndcg_mean"] = float(np.mean(s.ndcg))
            metrics["k_mean"] = float(np.mean(s.k))
        for key in ("loss", "policy_gradient_loss", "value_loss", "entropy_loss", "approx_kl", "clip_fraction",
                    "explained_variance", "learning_rate", "clip_range"):
            if f"train/{key}" in values:
                metrics[key] = float(values[f"train/{key}"])
        self.metrics_logger.log_metrics(metrics, step=steps, kind="train")
        self.history.append(metrics)
        if final or self._updates_logged % self._log_every == 0:
            line = f"timesteps {steps}/{self.total_timesteps}"
            if "episode_reward_mean" in metrics:
                line += f" | reward {metrics['episode_reward_mean']:.4f}"
            if "ndcg_mean" in metrics:
                line += f" | nDCG {metrics['ndcg_mean']:.4f} | k {metrics['k_mean']:.2f}"
            if "loss" in metrics:
                line += f" | loss {metrics['loss']:.4f} | entropy {-metrics['entropy_loss']:.3f} | approx_kl {metrics['approx_kl']:.4f}"
            log.info(line)
        self.stats = _RolloutStats()


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
    resumed_from, resumed_best = None, None
    if resume:
        resumed_from = find_latest_checkpoint(checkpoint_dir, STEP_CHECKPOINT_PATTERN)
        if resumed_from is None:
            log.info("--resume: no checkpoint in %s yet, training from scratch", checkpoint_dir)
        else:
            state = load_checkpoint(resumed_from, kind=CHECKPOINT_KIND)
            restore_training_checkpoint(state, resumed_from, cfg, model, venv, setup.env_info)
            resumed_best = state.get("best_on_val")
            log.info("resumed from %s at timestep %d", resumed_from, model.num_timesteps)
    save_config(cfg, checkpoint_dir / "config.yaml")

    # 3. train
    total = cfg.training.total_timesteps
    log.info("PPO on %s: %d timesteps, %d envs x %d steps per rollout, policy MLP %d x %d (%s), device %s",
             cfg.env.id, total, cfg.training.n_envs, cfg.training.n_steps, cfg.model.n_layers, cfg.model.hidden_dim,
             cfg.model.activation, model.device)
    monitor = TrainingMonitor(cfg, venv, setup, metrics_logger, total, resumed_best)
    started = time.perf_counter()
    with single_torch_thread():
        model.learn(total_timesteps=max(0, total - model.num_timesteps), callback=monitor, log_interval=1,
                    reset_num_timesteps=resumed_from is None)
    train_seconds = time.perf_counter() - started
    final_state = policy_state(cfg, model, venv, setup.env_info)
    best = monitor.best
    if best is not None:
        best_path = save_checkpoint(best["state"], checkpoint_dir / BEST_MODEL_FILE)
        log.info("best policy on val: timestep %d, val mean reward %.4f -> %s", best["timesteps"], best["val_mean_reward"], best_path)
        if cfg.training.final_policy == "best_val":
            final_state = best["state"]
    final_path = save_checkpoint(final_state, checkpoint_dir / FINAL_MODEL_FILE)
    log.info("trained to timestep %d in %.1fs -> %s (the policy of timestep %d)", model.num_timesteps, train_seconds, final_path,
             final_state["timesteps"])
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
    report = {"env": cfg.env.id, "timesteps": int(model.num_timesteps), "evaluated_on": where, "strategies": results, "summary": summary,
              "final_policy": cfg.training.final_policy, "policy_timesteps": int(final_state["timesteps"])}
    if best is not None:
        report["best_on_val"] = {"timesteps": int(best["timesteps"]), "val_mean_reward": best["val_mean_reward"]}
    if cfg.is_retrieval_env:
        report["train_split"] = retrieval_split_summary(policy, setup.table, setup.train_query_ids,
                                                        cfg.env.cost_per_extra_doc, setup.observation)
    if setup.make_test_env is not None:
        with single_torch_thread():
            test_results = evaluate_strategies(policy, setup.make_test_env, len(setup.test_query_ids), cfg.system.seed + 2_000_000,
                                               reseed=False)
        report["test_split"] = test_split_report(test_results, summary, len(setup.test_query_ids))
        test_table = format_strategy_table(test_results)
        print(f"PPO policy vs baselines on the {len(setup.test_query_ids)} test queries (untouched by training and tuning)\n{test_table}\n")
        log.info("test split (%d queries):\n%s", len(setup.test_query_ids), test_table)
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
    if "test_split" in report:
        metrics.update({f"test_{k}": v for k, v in report["test_split"].items() if k != "strategies"})
    for key in ("mean_ndcg", "mean_k"):
        if key in results["trained"]:
            metrics[f"trained_{key}"] = results["trained"][key]
    outputs = {"final_model": str(final_path), "eval_metrics": str(eval_path), "eval_plot": str(plot_path),
               "config": str(checkpoint_dir / "config.yaml"), "train_log": str(log_dir / "train.log")}
    last = monitor.last_checkpoint or find_latest_checkpoint(checkpoint_dir, STEP_CHECKPOINT_PATTERN)
    if last is not None:
        outputs["last_checkpoint"] = str(last)
    return {"metrics": metrics, "outputs": outputs}
