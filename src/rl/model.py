"""The trained policy on its own: ``final_model.pt`` loaded for inference without stable-baselines3.

``final_model.pt`` holds the weights of SB3's MLP actor-critic (``ActorCriticPolicy``: an
MLP for the policy, one for the value, ``action_net`` and ``value_net`` heads), the
running observation statistics used to normalise what the policy sees, the architecture
and, for the retrieval environment, the action table and what the observation is made of.
:class:`RLPolicy` rebuilds that network in plain torch with the same parameter names, so
the state dict loads as is.

    policy = load_rl_policy("checkpoints/rl/final_model.pt")      # src.rl.load
    action = policy.act(observation)                               # any environment
    choice = choose_retrieval_action(policy, retriever, "How do I parse JSON?")
    results = retriever.search(query, top_k=choice.k, mode=choice.mode)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from src.core.errors import CheckpointError
from src.core.logging import get_logger
from src.rl.features import query_features
from src.rl.retrieval_env import QueryObservation, RetrievalAction

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}

log = get_logger("rl")


def _mlp(in_dim: int, hidden_dim: int, n_layers: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class RLPolicy(nn.Module):
    """SB3's MLP actor-critic for a flat Box observation and a Discrete or Box action.

    ``architecture``: ``obs_dim``, ``action_space`` (``{"type": "discrete", "n"}`` or
    ``{"type": "box", "shape", "low", "high"}``), ``hidden_dim``, ``n_layers``, ``activation``.
    ``obs_normalization`` (``mean``, ``var``, ``epsilon``, ``clip_obs``), when given, is
    applied to every observation as SB3's ``VecNormalize`` does. ``env_info`` describes the
    environment it was trained on (id; for the retrieval env the action table).
    """

    def __init__(self, architecture: dict[str, Any], obs_normalization: dict[str, Any] | None = None, env_info: dict | None = None) -> None:
        super().__init__()
        self.architecture = dict(architecture)
        self.env_info = dict(env_info or {})
        obs_dim, hidden, layers, act = (architecture[k] for k in ("obs_dim", "hidden_dim", "n_layers", "activation"))
        space = architecture["action_space"]
        self.discrete = space["type"] == "discrete"
        out_dim = int(space["n"]) if self.discrete else int(np.prod(space["shape"]))
        self.mlp_extractor = nn.Module()
        self.mlp_extractor.policy_net = _mlp(obs_dim, hidden, layers, act)
        self.mlp_extractor.value_net = _mlp(obs_dim, hidden, layers, act)
        self.action_net = nn.Linear(hidden, out_dim)
        self.value_net = nn.Linear(hidden, 1)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.zeros(out_dim))
            self.register_buffer("action_low", torch.tensor(space["low"], dtype=torch.float32).reshape(-1), persistent=False)
            self.register_buffer("action_high", torch.tensor(space["high"], dtype=torch.float32).reshape(-1), persistent=False)
        self.obs_normalization = obs_normalization
        if obs_normalization is not None:
            self.register_buffer("obs_mean", torch.as_tensor(obs_normalization["mean"], dtype=torch.float32), persistent=False)
            self.register_buffer("obs_var", torch.as_tensor(obs_normalization["var"], dtype=torch.float32), persistent=False)

    @property
    def obs_dim(self) -> int:
        return int(self.architecture["obs_dim"])

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """What the network sees: ``clip((obs - mean) / sqrt(var + eps), +-clip_obs)``, if normalised."""
        if self.obs_normalization is None:
            return obs
        norm = self.obs_normalization
        scaled = (obs - self.obs_mean) / torch.sqrt(self.obs_var + norm["epsilon"])
        return scaled.clamp(-norm["clip_obs"], norm["clip_obs"])

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw observations ``(n, obs_dim)`` -> ``(action logits or means, values (n,))``."""
        features = self.normalize(obs.reshape(obs.shape[0], -1).float())
        return self.action_net(self.mlp_extractor.policy_net(features)), self.value_net(self.mlp_extractor.value_net(features)).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True) -> Any:
        """The action for one raw observation (an int, or an array for Box actions), or an
        array of actions for a batch ``(n, obs_dim)``. ``deterministic``: the most likely
        action (argmax / mean); otherwise one sampled from the policy."""
        obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.action_net.weight.device)
        single = obs_t.numel() == self.obs_dim
        out, _ = self(obs_t.reshape(1 if single else obs_t.shape[0], -1))
        if self.discrete:
            actions = out.argmax(-1) if deterministic else torch.distributions.Categorical(logits=out).sample()
            actions = actions.cpu().numpy()
            return int(actions[0]) if single else actions
        if not deterministic:
            out = out + torch.randn_like(out) * self.log_std.exp()
        actions = torch.maximum(torch.minimum(out, self.action_high), self.action_low).cpu().numpy()
        return actions[0] if single else actions

    @torch.no_grad()
    def action_probabilities(self, obs: np.ndarray) -> np.ndarray:
        """Discrete policies: the probability of each action for one raw observation."""
        if not self.discrete:
            raise TypeError("action_probabilities is for Discrete action spaces")
        logits, _ = self(torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(1, -1))
        return torch.softmax(logits, -1)[0].cpu().numpy()


def retrieval_actions(policy: RLPolicy) -> list[RetrievalAction]:
    """The ``(mode, k)`` of each action of a policy trained on the retrieval environment."""
    actions = policy.env_info.get("actions")
    if not actions:
        raise CheckpointError(f"this policy was trained on '{policy.env_info.get('id')}', not on MARK's retrieval environment")
    return [RetrievalAction(mode, int(k)) for mode, k in actions]


def retrieval_observation(policy: RLPolicy, retriever: Any, query: str, query_vector: np.ndarray | None = None) -> np.ndarray:
    """The observation the retrieval policy expects for ``query``, computed with ``retriever``
    (``query_vector``: the query's embedding when already computed)."""
    retrieval_actions(policy)  # a policy of another environment is a one-line error
    trained_on = policy.env_info.get("corpus_checksum")
    if trained_on and getattr(getattr(retriever, "index", None), "corpus_checksum", trained_on) != trained_on:
        log.warning("the retriever's index is not the one the RL policy was trained on; its choices may be off")
    vector = retriever.embed_queries([query])[0] if query_vector is None else np.asarray(query_vector, dtype=np.float32)
    signals = query_features(retriever, query, vector)
    return QueryObservation.from_state(policy.env_info["observation"])(vector, signals)[0]


def choose_retrieval_action(policy: RLPolicy, retriever: Any, query: str, query_vector: np.ndarray | None = None) -> RetrievalAction:
    """The retrieval strategy ``(mode, k)`` the policy picks for ``query``.

    ``retriever`` is the :class:`src.rag.retriever.Retriever` of the index the policy was
    trained on (``load_rag_index``). Search with the result:
    ``retriever.search(query, top_k=choice.k, mode=choice.mode)``.
    """
    return retrieval_actions(policy)[int(policy.act(retrieval_observation(policy, retriever, query, query_vector)))]
