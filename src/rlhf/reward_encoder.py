"""Stage 2 with ``training.reward.backbone: encoder``: the reward model as a pretrained
bidirectional encoder (the offline all-MiniLM-L6-v2 by default, or any HF encoder) reading
``(prompt, response)`` as one sentence pair, with a scalar head on the mean-pooled hidden
states and the same Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))``.

The encoder reads both texts at once, in both directions, and starts from weights that
already tell sentences about one topic from sentences about another: that is what the
sample preferences need (the rejected answers are truncated, generic or about another
function). Its tokenizer is not the policy's, so it scores decoded text: PPO and the
evaluation decode the policy's prompt and response ids and pass strings.

Trained through the shared engine like the Mamba reward model; delivers ``reward_model.pt``
(kind ``rlhf_reward``, ``extra.backbone == "encoder"``) that
:func:`src.rlhf.load.load_reward_model` reads back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from src.core.checkpoint import load_state_dict_checked, save_checkpoint
from src.core.config import config_to_dict
from src.core.errors import ConfigError
from src.core.hub import hub_error, resolve_pretrained
from src.core.logging import get_logger
from src.core.runtime import resolve_device, resolve_mixed_precision, seed_everything
from src.data.readers import PreferenceExample
from src.rlhf.checkpoints import fit_best, same_inputs_check, stage_record
from src.rlhf.config import RewardConfig, StageConfig
from src.data.prompts import is_grounded_prompt
from src.rlhf.data import apply_template, evaluate_in_batches
from src.rlhf.reward_model import count_pairs, pairwise_metrics
from src.training.engine import TrainTask

KIND = "rlhf_reward"  # the same file kind as the Mamba reward model: one loader reads both
BACKBONE = "encoder"
log = get_logger("rlhf_reward")


def load_encoder(name: str, key: str = "training.reward.encoder_model", pretrained: bool = True, layers: int | None = None):
    """``(encoder, tokenizer)`` for ``name`` (a folder, ``minilm-local`` or a hub id);
    ``pretrained=False`` builds the architecture only (its weights come from a checkpoint);
    ``layers``: keep only the first N transformer layers (the pretrained weights of the others are not loaded)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    source = resolve_pretrained(name, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = AutoConfig.from_pretrained(source)
        if layers is not None:
            if layers > config.num_hidden_layers:
                raise ConfigError(f"training.reward.encoder_layers: {layers}, but {name} has {config.num_hidden_layers} layers")
            config.num_hidden_layers = layers
        if pretrained:
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # "some weights were not used": the layers left out, on purpose
            try:
                encoder = AutoModel.from_pretrained(source, config=config)
            finally:
                hf_logging.set_verbosity(verbosity)
        else:
            encoder = AutoModel.from_config(config)
    except ConfigError:
        raise
    except Exception as err:  # offline hub miss, not a model folder, ...
        raise hub_error(name, key, err) from None
    return encoder, tokenizer


def freeze_lower_layers(encoder: nn.Module, layers: int) -> int:
    """Freeze the embeddings and the first ``layers`` transformer layers of a BERT-style
    encoder (parameters named ``embeddings.*`` and ``...layer.<i>.*``); returns the number of
    parameters left trainable."""
    if layers:
        index = re.compile(r"(?:^|\.)layer\.(\d+)\.")
        for name, param in encoder.named_parameters():
            found = index.search(name)
            if name.startswith("embeddings.") or (found is not None and int(found.group(1)) < layers):
                param.requires_grad_(False)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


class EncoderRewardModel(nn.Module):
    """A pretrained encoder with a linear scalar head on the mean of its last hidden states.

    ``score_mean`` / ``score_std`` (buffers, saved with the weights) turn raw scores into
    normalized ones, as for :class:`src.rlhf.reward_model.RewardModel`.
    """

    backbone = BACKBONE

    def __init__(self, encoder: nn.Module, tokenizer, max_length: int = 256, template: str = "{prompt}\n", precision: str = "fp32") -> None:
        super().__init__()
        self.encoder = encoder
        self.precision = precision  # bf16: scored under bf16 autocast, as it was validated while training
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.template = template
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """Word-piece ids of ``(prompt, response)`` pairs; the response is cut first when a
        pair is too long (the prompt says what is asked)."""
        batch = self.tokenizer(
            list(prompts), list(responses), truncation="longest_first", max_length=self.max_length,
            padding=True, return_tensors="pt",
        )
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores (B,) of encoded pairs."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled).squeeze(-1).float()

    def normalized(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.score_mean) / self.score_std

    @torch.no_grad()
    def score_texts(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32, templated: bool = False) -> torch.Tensor:
        """Raw scores (B,) of ``responses`` to ``prompts``, on CPU. Plain prompts get the
        template applied here, as in training; ``templated`` prompts already have it."""
        device = self.head.weight.device
        was_training = self.training
        self.eval()
        texts = [p if templated else apply_template(self.template, p) for p in prompts]
        texts = [question_first(p) for p in texts]
        # Batches of pairs of similar length, each padded to its longest: most pairs are short
        # (median ~30 word-pieces) and a batch in prompt order is padded to its one long pair.
        lengths = [len(ids) for ids in self.tokenizer(texts, list(responses), truncation="longest_first", max_length=self.max_length)["input_ids"]] if texts else []
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        scores = torch.zeros(len(texts))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.encode([texts[i] for i in rows], [responses[i] for i in rows])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                scores[rows] = self(**{k: v.to(device) for k, v in batch.items()}).cpu()
        self.train(was_training)
        return scores

    @torch.no_grad()
    def score_responses(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], policy_tokenizer) -> torch.Tensor:
        """Raw scores of a policy's token ids (``<|bos|> templated prompt`` and the sampled
        response): both decoded with the policy's tokenizer (special tokens dropped), then read as text."""
        prompts = [policy_tokenizer.decode(p) for p in prompt_ids]
        responses = [policy_tokenizer.decode(r) for r in response_ids]
        return self.score_texts(prompts, responses, templated=True)


def question_first(prompt: str) -> str:
    """A grounded prompt with its ``Question: ...\nAnswer:`` moved before the context, for the
    encoder only: a pair longer than ``max_length`` is cut at its end, and the question must
    stay. Other prompts are returned unchanged."""
    if not is_grounded_prompt(prompt):
        return prompt
    head, _, tail = prompt.rpartition("Question: ")
    return f"Question: {tail}\n\n{head.rstrip()}"


class TextPreferenceDataset(Dataset):
    """Item ``i``: ``(templated prompt, chosen, rejected)`` strings of one preference pair."""

    def __init__(self, examples: Sequence[PreferenceExample], template: str) -> None:
        self.items = [(question_first(apply_template(template, e.prompt)), e.chosen, e.rejected) for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, str, str]:
        return self.items[index]

    def lengths(self) -> list[int]:
        return [len(p) + max(len(c), len(r)) for p, c, r in self.items]


def collate_text_preferences(model: EncoderRewardModel, items: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
    """2B encoded pairs: rows ``0..B-1`` (prompt, chosen), rows ``B..2B-1`` (prompt, rejected)."""
    prompts = [p for p, _, _ in items]
    return model.encode(prompts + prompts, [c for _, c, _ in items] + [r for _, _, r in items])


def pairwise_loss_sum(model: EncoderRewardModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bradley-Terry loss summed over the pairs of a batch (chosen rows first, then rejected
    rows); the engine divides by the pairs of the whole optimizer step (:func:`count_pairs`)."""
    chosen, rejected = model(**batch).chunk(2)
    return -F.logsigmoid(chosen - rejected).sum()


def _eval_step(model: EncoderRewardModel, batch: dict[str, torch.Tensor]) -> dict[str, list]:
    chosen, rejected = model(**batch).chunk(2)
    return {"chosen": chosen.tolist(), "rejected": rejected.tolist()}


def evaluate_text_pairs(model: EncoderRewardModel, examples: Sequence[PreferenceExample], batch_size: int = 32) -> dict[str, float]:
    """Pairwise accuracy / loss / margin (:func:`src.rlhf.reward_model.pairwise_metrics`) on ``examples``."""
    dataset = TextPreferenceDataset(examples, model.template)
    outputs = evaluate_in_batches(model, dataset, lambda items: collate_text_preferences(model, items), _eval_step, batch_size)
    return pairwise_metrics(outputs)


def train_encoder_reward_model(
    train_examples: Sequence[PreferenceExample],
    val_examples: Sequence[PreferenceExample],
    stage: StageConfig,
    resume: bool = False,
) -> dict[str, Any]:
    """Train an :class:`EncoderRewardModel` on ``training.reward.encoder_model`` with the
    pairwise loss; the checkpoint with the lowest val pairwise loss becomes ``stage.output_file``.
    Returns ``{"metrics": ..., "outputs": ...}``."""
    cfg: RewardConfig = stage.training
    seed_everything(stage.system.seed)
    encoder, tokenizer = load_encoder(cfg.encoder_model, layers=cfg.encoder_layers)
    if cfg.frozen_layers > encoder.config.num_hidden_layers:
        raise ConfigError(f"training.reward.frozen_layers: {cfg.frozen_layers}, but the encoder has {encoder.config.num_hidden_layers} layers")
    trainable = freeze_lower_layers(encoder, cfg.frozen_layers)
    seed_everything(stage.system.seed)  # the head's initialisation must not depend on how the encoder loaded
    precision = "bf16" if resolve_mixed_precision(cfg.mixed_precision, resolve_device(stage.system.device)) == "bf16" else "fp32"
    model = EncoderRewardModel(encoder, tokenizer, cfg.max_length, stage.model.prompt_template, precision)
    train_set = TextPreferenceDataset(train_examples[: cfg.max_train_examples], stage.model.prompt_template)
    val_set = TextPreferenceDataset(val_examples[: cfg.max_val_examples], stage.model.prompt_template)
    log.info("reward model: %d train / %d val preference pairs, encoder %s (%d layers, first %d frozen, %d trainable parameters), "
             "%d word-pieces per pair", len(train_set), len(val_set), cfg.encoder_model, encoder.config.num_hidden_layers,
             cfg.frozen_layers, trainable, cfg.max_length)


    task = TrainTask(
        name=KIND,
        kind=KIND,
        model=model,
        train_dataset=train_set,
        val_dataset=val_set,
        collate_fn=lambda items: collate_text_preferences(model, items),
        loss_fn=pairwise_loss_sum,
        count_items=count_pairs,
        eval_step=_eval_step,
        compute_metrics=pairwise_metrics,
        metric_for_best="val_loss",
        extra_state={**encoder_extra(model, cfg.encoder_model), "inputs": dict(stage.inputs)},
        check_resume=same_inputs_check(stage, "reward-model"),
        example_lengths=train_set.lengths(),
    )
    result, best = fit_best(task, stage, resume, "reward-model")

    # Centre on the chosen training answers, scale by the spread of all scores (as the Mamba RM).
    pairs = [train_set[i] for i in range(min(len(train_set), cfg.normalization_examples))]
    raw_prompts = [e.prompt for e in train_examples[: len(pairs)]]
    chosen = model.score_texts(raw_prompts, [c for _, c, _ in pairs])
    rejected = model.score_texts(raw_prompts, [r for _, _, r in pairs])
    model.score_mean.fill_(float(chosen.mean()))
    model.score_std.fill_(float(torch.cat([chosen, rejected]).std().clamp_min(1e-6)))

    metrics = {
        "backbone": BACKBONE,
        "encoder_model": cfg.encoder_model,
        "val_accuracy": float(best["metrics"]["val_accuracy"]),
        "val_loss": float(best["metrics"]["val_loss"]),
        "val_margin": float(best["metrics"]["val_margin"]),
        "train_accuracy_sample": float((chosen > rejected).float().mean()),
        "score_mean": float(model.score_mean),
        "score_std": float(model.score_std),
        "best_step": int(best["step"]),
        "global_step": result.global_step,
        "train_examples": len(train_set),
        "val_examples": len(val_set),
    }
    save_encoder_reward_model(stage.output_file, model, cfg.encoder_model, stage, metrics)
    log.info("reward model (encoder): val pairwise accuracy %.3f: saved %s", metrics["val_accuracy"], stage.output_file)
    return {"metrics": metrics, "outputs": {"reward_model": str(stage.output_file), "checkpoint_dir": str(stage.paths.checkpoint_dir)}}


def encoder_extra(model: EncoderRewardModel, encoder_model: str) -> dict[str, Any]:
    """What :func:`load_encoder_reward_model` needs beside the weights."""
    return {"backbone": BACKBONE, "encoder_model": encoder_model, "max_length": model.max_length, "prompt_template": model.template,
            "encoder_layers": int(model.encoder.config.num_hidden_layers), "precision": model.precision}


def save_encoder_reward_model(path: Path, model: EncoderRewardModel, encoder_model: str, stage: StageConfig, metrics: dict[str, Any]) -> Path:
    """Write ``reward_model.pt`` (kind ``rlhf_reward``, backbone ``encoder``)."""
    return save_checkpoint(
        {
            "kind": KIND,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "extra": encoder_extra(model, encoder_model),
            "config": config_to_dict(stage),
            "rlhf": stage_record(stage, metrics),
        },
        path,
    )


def load_encoder_reward_model(state: dict[str, Any], path: str | Path, device: str | torch.device = "cpu") -> EncoderRewardModel:
    """The :class:`EncoderRewardModel` of a loaded ``reward_model.pt`` ``state``, in eval mode."""
    extra = state.get("extra") or {}
    encoder, tokenizer = load_encoder(extra["encoder_model"], key=f"{path}: encoder_model", pretrained=False,
                                      layers=extra.get("encoder_layers"))
    model = EncoderRewardModel(encoder, tokenizer, int(extra.get("max_length", 256)), extra.get("prompt_template", "{prompt}\n"),
                               extra.get("precision", "fp32"))
    load_state_dict_checked(model, state["model"], path)
    return model.to(device).eval()
