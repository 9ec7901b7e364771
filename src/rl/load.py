"""Load a trained RL policy without stable-baselines3: what ``load_model("rl")`` calls."""

from __future__ import annotations

from pathlib import Path

from src.core.checkpoint import load_checkpoint, load_state_dict_checked
from src.core.errors import CheckpointError
from src.rl.model import RLPolicy

POLICY_KIND = "rl-policy"


def load_rl_policy(path: str | Path = "checkpoints/rl/final_model.pt", device: str = "cpu") -> RLPolicy:
    """Load ``final_model.pt`` (or a ``checkpoint_step_N.pt``) as an :class:`RLPolicy` in eval mode.

    Any problem (missing, corrupt, another model's file, mismatched weights) is a one-line
    ``CheckpointError`` naming the file.
    """
    path = Path(path)
    state = load_checkpoint(path, map_location=device)
    if state.get("kind") not in (POLICY_KIND, "rl"):
        raise CheckpointError(f"{path}: checkpoint is for '{state.get('kind')}', expected an RL policy")
    return policy_from_state(state, path).to(device)


def policy_from_state(state: dict, path: str | Path = "<memory>") -> RLPolicy:
    """The :class:`RLPolicy` (eval mode) of a policy state: ``final_model.pt``'s contents, or a
    step checkpoint's (the same policy entries plus training state)."""
    try:
        policy = RLPolicy(state["architecture"], state.get("obs_normalization"), state.get("env_info"))
        weights = state["policy"]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: malformed RL policy checkpoint (missing {err})") from None
    load_state_dict_checked(policy, weights, path)
    policy.timesteps = int(state.get("timesteps", 0))
    return policy.eval()
