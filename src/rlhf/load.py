"""Load the exported RLHF model: what ``load_model("rlhf")`` and the API server call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from src.core.checkpoint import load_checkpoint, load_state_dict_checked
from src.core.errors import CheckpointError, NotTrainedError
from src.mamba.model import MambaArgs, MambaLM
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
    extra = state.get("extra") or {}
    if "model_args" not in extra or "tokenizer_json" not in extra or "model" not in state:
        raise CheckpointError(f"{path}: not a complete RLHF model (weights, architecture or tokenizer missing)")
    model = MambaLM(MambaArgs.from_dict(extra["model_args"]))
    load_state_dict_checked(model, state["model"], path)
    tokenizer = MambaTokenizer.from_str(extra["tokenizer_json"], str(path))
    return model.to(device).eval(), tokenizer


def read_rlhf_metadata(path_or_dir: str | Path = "checkpoints/rlhf") -> dict[str, Any]:
    """The exported model's ``config``, ``metrics`` and ``provenance`` (no weights built)."""
    state = load_checkpoint(resolve_final_model(path_or_dir), map_location="cpu", kind=KIND)
    return {key: state.get(key) for key in ("config", "metrics", "provenance")}


class RewardScorer:
    """The reward model's normalized score of ``(prompt, response)`` pairs, each read as in
    training: ``<|bos|>`` + the templated prompt + the response + ``<|eos|>`` (cut to the
    trained lengths)."""

    def __init__(self, model, tokenizer: MambaTokenizer, fmt) -> None:
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One normalized score per pair, in order (higher: preferred)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        sequences = [self.fmt.prompt_ids(p) + self.fmt.response_ids(r) for p, r in zip(prompts, responses)]
        with torch.inference_mode():
            raw = self.model.score_sequences(sequences, self.tokenizer.pad_id)
            return self.model.normalized(raw).tolist()


def load_reward_scorer(path: str | Path, device: str | torch.device = "cpu") -> RewardScorer:
    """A :class:`RewardScorer` over ``reward_model.pt`` (or the folder holding it); missing is
    a ``NotTrainedError`` naming the pipeline command."""
    from src.rlhf.data import PromptFormat
    from src.rlhf.reward_model import KIND as REWARD_KIND, load_reward_model

    path = Path(path)
    path = path / "reward_model.pt" if path.is_dir() else path
    if not path.is_file():
        raise NotTrainedError(f"{path}: no reward model; run `{PIPELINE_COMMAND}`")
    model, tokenizer = load_reward_model(path, device)
    settings = (load_checkpoint(path, map_location="cpu", kind=REWARD_KIND).get("config") or {}).get("model") or {}
    fmt = PromptFormat(
        tokenizer,
        settings.get("prompt_template", PromptFormat.template),
        settings.get("max_prompt_tokens", PromptFormat.max_prompt_tokens),
        settings.get("max_response_tokens", PromptFormat.max_response_tokens),
    )
    return RewardScorer(model, tokenizer, fmt)
