"""RL: a PPO policy (stable-baselines3) that learns MARK's retrieval strategy.

* ``config.py``: the typed config of ``configs/rl_train.yaml``.
* ``retrieval_env.py``: :class:`RetrievalPolicyEnv` (Gymnasium) and the precomputed
  table of every retrieval action's outcome per query.
* ``features.py``: what the policy observes about a query (IDF, OOV, score margins, agreement).
* ``synthetic.py``: training queries made from the corpus (``env.queries: synthetic | both``).
* ``train.py``: the recipe: environments, PPO, MARK-format checkpoints and exact resume,
  then evaluation (:func:`run`).
* ``evaluate.py``: the trained policy next to random, fixed and oracle strategies.
* ``model.py``: :class:`RLPolicy`, SB3's actor-critic in plain torch, and
  :func:`choose_retrieval_action`.
* ``load.py``: ``final_model.pt`` for inference without SB3 (:func:`load_rl_policy`).

The entry point is ``python -m src.scripts.train_rl``.
"""

from src.rl.config import RLConfig
from src.rl.load import load_rl_policy
from src.rl.model import RLPolicy, choose_retrieval_action
from src.rl.retrieval_env import RetrievalAction, RetrievalPolicyEnv

__all__ = ["RLConfig", "RLPolicy", "RetrievalAction", "RetrievalPolicyEnv", "choose_retrieval_action", "load_rl_policy"]
