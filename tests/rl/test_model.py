"""The standalone policy of final_model.pt: same actions as stable-baselines3's, no SB3 zip needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import VecNormalize

from src.core.checkpoint import save_checkpoint
from src.core.config import validate_config
from src.core.errors import CheckpointError
from src.rl.config import RLConfig
from src.rl.load import load_rl_policy
from src.rl.model import RLPolicy, retrieval_actions
from src.rl.train import build_env_setup, build_ppo, build_vec_env, policy_state, single_torch_thread


def _model(tmp_path, env_id, normalize, **model):
    cfg = validate_config({
        "env": {"id": env_id},
        "model": {"hidden_dim": 16, **model},
        "training": {"n_envs": 2, "n_steps": 32, "batch_size": 32, "n_epochs": 2, "normalize_observations": normalize, "show_progress": False},
        "paths": {"checkpoint_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "logs")},
        "system": {"device": "cpu", "seed": 3},
    }, RLConfig)
    setup = build_env_setup(cfg)
    venv = build_vec_env(setup, cfg)
    model = build_ppo(cfg, venv)
    with single_torch_thread():
        model.learn(256)  # a few updates, so weights and observation statistics are not at their initial values
    return cfg, setup, venv, model


@pytest.mark.parametrize(("env_id", "normalize", "activation"), [("CartPole-v1", True, "tanh"), ("Pendulum-v1", False, "relu")])
def test_standalone_policy_acts_like_sb3(tmp_path, env_id, normalize, activation):
    cfg, setup, venv, model = _model(tmp_path, env_id, normalize, activation=activation, n_layers=3)
    path = save_checkpoint(policy_state(cfg, model, venv, setup.env_info), tmp_path / "final_model.pt")
    policy = load_rl_policy(path)
    assert isinstance(policy, RLPolicy) and policy.timesteps == model.num_timesteps
    assert (policy.obs_normalization is not None) == normalize

    rng = np.random.default_rng(0)
    low = np.maximum(model.observation_space.low, -3)
    raw_obs = rng.uniform(low, -low, size=(64, *model.observation_space.shape)).astype(np.float32)
    sb3_input = venv.normalize_obs(raw_obs) if isinstance(venv, VecNormalize) else raw_obs
    expected, _ = model.predict(sb3_input, deterministic=True)
    np.testing.assert_allclose(policy.act(raw_obs), expected, atol=1e-5)
    single = policy.act(raw_obs[0])
    assert (single == expected[0]) if np.isscalar(single) else np.allclose(single, expected[0], atol=1e-5)
    _, values = policy(torch.as_tensor(raw_obs))
    expected_values = model.policy.predict_values(torch.as_tensor(sb3_input)).squeeze(-1).detach()
    torch.testing.assert_close(values, expected_values, atol=1e-5, rtol=1e-5)
    if policy.discrete:
        probs = policy.action_probabilities(raw_obs[0])
        assert probs.shape == (2,) and probs.sum() == pytest.approx(1.0, abs=1e-6)
        with pytest.raises(CheckpointError, match="not on MARK's retrieval environment"):
            retrieval_actions(policy)


def test_bad_policy_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_rl_policy(tmp_path / "missing.pt")
    save_checkpoint({"kind": "mamba", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected an RL policy"):
        load_rl_policy(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_rl_policy(tmp_path / "junk.pt")
    cfg, setup, venv, model = _model(tmp_path, "CartPole-v1", True)
    state = policy_state(cfg, model, venv, setup.env_info)
    state["architecture"] = {**state["architecture"], "hidden_dim": 32}
    save_checkpoint(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not match the model architecture"):
        load_rl_policy(tmp_path / "mismatch.pt")
