"""The RL config: the spec's keys and defaults, the shipped config files, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.core.config import load_config, validate_config
from src.core.errors import ConfigError
from src.rl.config import RETRIEVAL_ENV_ID, RLConfig

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_specs():
    cfg = RLConfig()
    assert cfg.model.policy_model == "ppo" and cfg.model.hidden_dim == 256
    assert cfg.training.total_timesteps == 10000 and cfg.training.learning_rate == 0.0003
    assert cfg.env.id == RETRIEVAL_ENV_ID and cfg.is_retrieval_env
    assert str(cfg.paths.checkpoint_dir) == "checkpoints/rl" and str(cfg.paths.log_dir) == "logs/rl"
    assert str(cfg.data.rag_index_dir) == "checkpoints/rag" and str(cfg.data.eval_file) == "data/rag_eval.jsonl"


@pytest.mark.parametrize("name", ["rl_train.yaml", "rl_cartpole.yaml", "demo/rl_train.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name, RLConfig)
    assert cfg.model.policy_model == "ppo"


def test_spec_values_in_the_default_config_file():
    cfg = load_config(REPO / "configs" / "rl_train.yaml", RLConfig)
    assert (cfg.model.hidden_dim, cfg.training.total_timesteps, cfg.training.learning_rate) == (256, 10000, 0.0003)


def test_cartpole_config_is_rl_zoos_tuned_ppo():
    cfg = load_config(REPO / "configs" / "rl_cartpole.yaml", RLConfig)
    t = cfg.training
    assert cfg.env.id == "CartPole-v1" and not cfg.is_retrieval_env
    assert (t.n_envs, t.total_timesteps, t.n_steps, t.batch_size, t.n_epochs) == (8, 100_000, 32, 256, 20)
    assert (t.gae_lambda, t.gamma, t.ent_coef, t.learning_rate, t.lr_schedule, t.clip_range, t.clip_range_schedule) == (
        0.8, 0.98, 0.0, 0.001, "linear", 0.2, "linear")
    assert (cfg.model.hidden_dim, cfg.model.n_layers, cfg.model.activation) == (64, 2, "tanh")  # SB3's MlpPolicy


def test_rlhf_section_is_accepted_and_ignored():
    cfg = validate_config({"rlhf": {"sft": {"epochs": 1}}, "paths": {"checkpoint_dir": "c", "log_dir": "l"}}, RLConfig)
    assert cfg.rlhf == {"sft": {"epochs": 1}}


@pytest.mark.parametrize(("override", "message"), [
    ("training.n_stepz=3", "training.n_stepz: unknown key"),
    ("model.policy_model=dqn", "model.policy_model"),
    ("env.k_choices=[1,0]", "k_choices must be positive"),
    ("env.k_choices=[3,3]", "must not repeat"),
    ("env.modes=[dense,splade]", "env.modes.1"),
    ("env.heldout_fraction=1.5", "env.heldout_fraction"),
    ("training.gamma=2", "training.gamma"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        load_config(REPO / "configs" / "rl_train.yaml", RLConfig, [override])
    assert "\n" not in str(err.value)
