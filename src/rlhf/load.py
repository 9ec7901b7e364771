"""Load the exported RLHF model: what ``load_model("rlhf")`` and the API server call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from src.core.checkpoint import load_checkpoint
from src.core.errors import NotTrainedError
from src.mamba.load import lm_from_state
from src.mamba.model import MambaLM
from src.mamba.tokenizer import MambaTokenizer

KIND = "rlhf"
FINAL_MODEL = "rlhf_final_model.pt"
PIPELINE_COMMAND = "python -m src.training.rlhf_pipeline --base-model mamba --config configs/rl_train.yaml --output-dir checkpoints/rlhf"


def resolve_final_model(path: str | Path) -> Path:
    """``path`` itself, or ``<path>/rlhf_final_model.pt`` for a folder; missing is a
    ``NotTrainedError`` naming the pipeline command."""
    path = Path(path)
    candidate = path / FINAL_MODEL if path.is_dir() else path
    if not candidate.is_file():
        raise NotTrainedError(f"{candidate}: no RLHF model; run `{PIPELINE_COMMAND}`")
    return candidate


def load_rlhf_model(
    path_or_dir: str | Path = "checkpoints/rlhf", device: str | torch.device = "cpu"
) -> tuple[MambaLM, MambaTokenizer]:
    """``(model, tokenizer)`` of an exported RLHF model, in eval mode on ``device``.

    The model is a :class:`MambaLM`: ``src.mamba.generate`` and friends work on it
    as on the base model.
    """
    path = resolve_final_model(path_or_dir)
    state = load_checkpoint(path, map_location="cpu", kind=KIND)
    model, tokenizer = lm_from_state(state, path, "RLHF model", device)
    # The prompt length it was trained on (longer prompts were cut to <|bos|> and their last
    # tokens): what the server cuts its grounded prompts to (src.api.generation.GenerationWorker.encode_grounded).
    limit = ((state.get("config") or {}).get("model") or {}).get("max_prompt_tokens")
    model.trained_prompt_tokens = int(limit) if limit else None
    return model, tokenizer


def read_rlhf_metadata(path_or_dir: str | Path = "checkpoints/rlhf") -> dict[str, Any]:
    """The exported model's ``config``, ``metrics`` and ``provenance`` (no weights built)."""
    state = load_checkpoint(resolve_final_model(path_or_dir), map_location="cpu", kind=KIND)
    return {key: state.get(key) for key in ("config", "metrics", "provenance")}


class RewardScorer:
    """A trained reward model as a plain scorer of ``(prompt, response)`` texts.

    :meth:`score` returns the reward model's normalized scores (0 = the mean score of the
    chosen training answers, unit spread), for either backbone: the encoder reads the texts;
    the Mamba reward model reads them through its own tokenizer and prompt template.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, template: str = "{prompt}\n",
                 max_prompt_tokens: int = 64, max_response_tokens: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.backbone = getattr(model, "backbone", "mamba")
        self.template = template
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Normalized reward of each response to its prompt (same length as ``prompts``)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        if self.backbone == "encoder":
            raw = self.model.score_texts(list(prompts), list(responses))
        else:
            from src.rlhf.data import PromptFormat

            fmt = PromptFormat(self.tokenizer, self.template, self.max_prompt_tokens, self.max_response_tokens)
            raw = self.model.score_responses([fmt.prompt_ids(p) for p in prompts], [fmt.response_ids(r) for r in responses], self.tokenizer)
        return [float(x) for x in self.model.normalized(raw.to(self.model.score_mean.device)).cpu()]


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """``(reward model, tokenizer)`` from ``reward_model.pt`` of either backbone, in eval mode on
    ``device``: a :class:`src.rlhf.reward_model.RewardModel` and the Mamba tokenizer, or an
    :class:`src.rlhf.reward_encoder.EncoderRewardModel` and its own word-piece tokenizer."""
    from src.rlhf.reward_encoder import load_encoder_reward_model
    from src.rlhf.reward_model import KIND as REWARD_KIND
    from src.rlhf.reward_model import load_reward_model as load_mamba_reward_model

    state = load_checkpoint(path, map_location="cpu", kind=REWARD_KIND)
    if (state.get("extra") or {}).get("backbone") == "encoder":
        model = load_encoder_reward_model(state, path, device)
        return model, model.tokenizer
    return load_mamba_reward_model(path, device)


def load_reward_scorer(path: str | Path, device: str | torch.device = "cpu") -> RewardScorer:
    """The reward model ``reward_model.pt`` (or a folder holding it) as a :class:`RewardScorer`;
    a missing file is a ``NotTrainedError`` naming the pipeline command."""
    path = Path(path)
    candidate = path / "reward_model.pt" if path.is_dir() else path
    if not candidate.is_file():
        raise NotTrainedError(f"{candidate}: no reward model; run `{PIPELINE_COMMAND}`")
    model, tokenizer = load_reward_model(candidate, device)
    model_cfg = (load_checkpoint(candidate, map_location="cpu").get("config") or {}).get("model") or {}
    return RewardScorer(
        model, tokenizer, model_cfg.get("prompt_template", "{prompt}\n"),
        int(model_cfg.get("max_prompt_tokens", 64)), int(model_cfg.get("max_response_tokens", 64)),
    )
