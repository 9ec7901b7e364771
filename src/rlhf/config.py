"""Typed configs of the RLHF pipeline (``configs/rlhf.yaml``, or the ``rlhf:`` section of
``configs/rl_train.yaml``).

Like TRL, every stage is a trainer function with its own typed config, and the shapes match:

    ============  ==========================  ===================================
    stage         trainer                     its config (``training.<stage>``)
    ============  ==========================  ===================================
    SFT           ``rlhf.sft.train_sft``      :class:`SFTConfig` (engine keys + SFT keys)
    reward model  ``rlhf.reward_model.train_reward_model``  :class:`RewardConfig` (engine keys + RM keys)
                  (``backbone: encoder``: ``rlhf.reward_encoder.train_encoder_reward_model``)
    PPO           ``rlhf.ppo.train_ppo``      :class:`PPOConfig`
    DPO           ``rlhf.dpo.train_dpo``      :class:`DPOConfig` (engine keys + DPO keys)
    evaluation    ``rlhf.evaluation.evaluate_rlhf``  :class:`EvaluationConfig` (``evaluation``)
    ============  ==========================  ===================================

Each trainer receives a :class:`StageConfig`: its own settings as ``training``, plus ``paths``
(the stage's working folder and log folder), ``system``, the file it writes and the sha256 of
what it starts from. That is exactly the shape the shared engine's ``fit`` reads, so SFT and
the reward model pass it straight to ``fit``.

The whole file (:class:`RLHFConfig`) has the five sections every MARK config has (``model``,
``training``, ``data``, ``paths``, ``system``) plus ``evaluation``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from src.core.config import (
    CONFIG_DIR,
    ExistingFile,
    PathsConfig,
    StrictModel,
    SystemConfig,
    TrainingConfig,
    apply_overrides,
    load_config,
    read_config_file,
    validate_config,
)
from src.core.errors import ConfigError
from src.core.logging import get_logger
from src.training.adapters import AdapterConfig

RLHF_CONFIG_NAME = "rlhf.yaml"
log = get_logger("rlhf")


class RLHFModelConfig(StrictModel):
    """The base model and how a prompt and a response become one token sequence."""

    base_model: Literal["mamba"] = Field("mamba", description="the language model RLHF starts from")
    base_checkpoint: Path = Field(
        Path("checkpoints/mamba/best_model.pt"),
        description="the base model: a MARK checkpoint (file, or a folder with best_model.pt), or a pretrained Mamba-2 "
        "folder in the transformers or mamba_ssm layout (--base-model FOLDER)",
    )
    tokenizer: Optional[str] = Field(
        None, description="a Hugging Face fast tokenizer folder, for a pretrained base folder without one (mamba_ssm layout)"
    )
    adapter: Optional[AdapterConfig] = Field(
        None, description="train a LoRA adapter in every stage (SFT, reward model backbone, PPO policy, DPO) on the "
        "frozen stage input; DPO and PPO then use the input itself (adapter disabled) as the reference",
    )
    prompt_template: str = Field(
        "{prompt}\n", description="text the model reads before the response; must contain {prompt} "
        "(not applied to retrieval-grounded prompts, which are read exactly as the server sends them)"
    )
    max_prompt_tokens: int = Field(64, ge=2, description="longer prompts keep <|bos|> and their last tokens (<|bos|> included); "
                                   "grounded prompts run to a few hundred tokens")
    max_response_tokens: int = Field(64, ge=1, description="SFT/RM responses are cut to this many tokens (+ <|eos|>)")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_prompt(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("must contain {prompt}")
        return value


class SFTConfig(TrainingConfig):
    """Supervised fine-tuning: the engine's keys (``src.core.config.TrainingConfig``) with
    fine-tuning defaults, plus which examples to use."""

    batch_size: int = Field(16, gt=0)
    num_epochs: int = Field(2, gt=0)
    learning_rate: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_train_examples: Optional[int] = Field(None, gt=0, description="use only the first N training pairs")
    max_val_examples: Optional[int] = Field(None, gt=0, description="use only the first N validation pairs")


class RewardConfig(TrainingConfig):
    """Reward model (Bradley-Terry on preference pairs): the engine's keys plus RM keys."""

    batch_size: int = Field(16, gt=0, description="preference pairs per batch (2x sequences)")
    num_epochs: int = Field(2, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    backbone: Literal["mamba", "encoder"] = Field(
        "encoder",
        description="mamba: the scalar head on the (SFT or base) Mamba LM; encoder: on a pretrained bidirectional "
        "encoder (encoder_model) reading (prompt, response) as one pair; it scores decoded text",
    )
    init_from: Literal["sft", "base"] = Field(
        "sft", description="backbone: mamba only: the SFT model (InstructGPT) or the base model under the head"
    )
    encoder_model: str = Field(
        "minilm-local", description="backbone: encoder only: a local folder, 'minilm-local' (offline) or an HF encoder id"
    )
    max_length: int = Field(256, ge=8, description="backbone: encoder only: word-pieces per (prompt, response) pair")
    encoder_layers: Optional[int] = Field(
        None, gt=0, description="backbone: encoder only: keep the encoder's first N transformer layers (null: all); "
        "a shallower encoder trains and scores (PPO, DPO pairs, evaluation) proportionally faster"
    )
    frozen_layers: int = Field(
        0, ge=0, description="backbone: encoder only: the embeddings and the first N layers stay frozen "
        "(no gradients through them); 0: everything trains"
    )
    max_train_examples: Optional[int] = Field(None, gt=0, description="use only the first N training pairs")
    max_val_examples: Optional[int] = Field(None, gt=0, description="use only the first N validation pairs")
    normalization_examples: int = Field(
        256, gt=0, description="training pairs scored after training to centre and scale the reward"
    )


class DPOConfig(TrainingConfig):
    """Direct Preference Optimization (Rafailov et al. 2023) of the SFT model against itself
    frozen as the reference: the engine's keys plus the DPO keys."""

    batch_size: int = Field(16, gt=0, description="preference pairs per batch (2x sequences)")
    num_epochs: int = Field(1, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="assumed share of flipped preference labels (conservative DPO); 0: plain DPO"
    )
    pairs: Literal["dataset", "sampled"] = Field(
        "dataset",
        description="dataset: the preference files' pairs; sampled: num_samples answers of the SFT model per prompt of "
        "those files, ranked by the reward model (best = chosen, worst = rejected: online / iterative DPO)",
    )
    num_samples: int = Field(4, ge=2, description="pairs: sampled: answers sampled per prompt")
    sample_temperature: float = Field(1.0, gt=0, description="pairs: sampled: sampling temperature")
    sample_max_new_tokens: int = Field(32, gt=0, description="pairs: sampled: answer length limit (a cut answer has no <|eos|>)")
    missing_eos_penalty: float = Field(1.0, ge=0, description="pairs: sampled: score lost by an answer cut before <|eos|> (as in PPO)")
    min_score_gap: float = Field(0.0, ge=0, description="pairs: sampled: prompts whose best and worst answers score closer are dropped")
    rpo_alpha: Optional[float] = Field(
        None, ge=0, description="weight of the chosen answer's per-token NLL added to the DPO loss (RPO, TRL's rpo_alpha); null: plain DPO"
    )
    max_train_examples: Optional[int] = Field(None, gt=0, description="use only the first N training pairs")
    max_val_examples: Optional[int] = Field(None, gt=0, description="use only the first N validation pairs")


class KLControlConfig(StrictModel):
    """The KL penalty coefficient beta: fixed, or adapted towards ``target`` (Ziegler et al. 2019)."""

    adaptive: bool = Field(True, description="adapt beta so that the KL to the reference tracks the target")
    init_coef: float = Field(0.1, ge=0, description="beta at the start (the fixed value when adaptive is false)")
    target: float = Field(6.0, gt=0, description="target KL(policy || reference), nats per response")
    horizon: int = Field(10000, gt=0, description="adaptive: responses over which beta moves by up to ~20% of the error")


class PPOConfig(StrictModel):
    """PPO on the language model (Ziegler et al. 2019; Stiennon et al. 2020; TRL's PPOTrainer)."""

    num_steps: int = Field(100, gt=0, description="PPO iterations: sample a batch of responses, then update")
    rollout_batch_size: int = Field(16, gt=0, description="prompts (responses) sampled per iteration")
    mini_batch_size: int = Field(8, gt=0, description="responses per gradient step")
    ppo_epochs: int = Field(4, gt=0, description="passes over each batch of responses")
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clipping epsilon")
    clip_range_value: float = Field(0.2, gt=0, description="value-function clipping around the old values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, gt=0, le=1, description="discount over response tokens")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    whiten_advantages: bool = True
    max_new_tokens: int = Field(32, gt=0, description="tokens sampled per response at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs use the same temperature)")
    missing_eos_penalty: Optional[float] = Field(
        1.0, ge=0, description="subtracted from the score of a response cut off before <|eos|> (null: none)"
    )
    score_clip: Optional[float] = Field(5.0, gt=0, description="clip normalized scores to [-x, x] (null: no clip)")
    kl: KLControlConfig = KLControlConfig()
    save_steps: int = Field(10, ge=0, description="resumable checkpoint every N iterations (0: only at the end)")
    log_steps: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _mini_batch_fits(self) -> "PPOConfig":
        if self.mini_batch_size > self.rollout_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must not exceed rollout_batch_size ({self.rollout_batch_size})"
            )
        return self


class EvaluationConfig(StrictModel):
    """Test-split comparison of the aligned policies (PPO, DPO) with the SFT model."""

    num_prompts: Optional[int] = Field(None, gt=0, description="test prompts to sample (null: all of data.sft_test_file)")
    num_pairs: Optional[int] = Field(None, gt=0, description="test preference pairs to rank (null: all of data.preferences_test_file)")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0, description="every model samples at this temperature")
    batch_size: int = Field(32, gt=0, description="responses generated / scored together")
    samples_in_report: int = Field(10, ge=0, description="test prompts whose answers and rewards go into the Markdown report")
    cosine_baseline_model: Optional[str] = Field(
        "minilm-local", description="sentence encoder of the zero-shot cosine(prompt, answer) baseline (null: no cosine baseline)"
    )


class RLHFTrainingConfig(StrictModel):
    """One typed config per trained stage."""

    method: Literal["ppo", "dpo", "both"] = Field(
        "both", description="alignment stage(s) after SFT and the reward model (--method)"
    )
    export: Literal["auto", "ppo", "dpo"] = Field(
        "auto", description="policy exported as rlhf_final_model.pt (what is served); auto: PPO when it ran, else DPO"
    )
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    dpo: DPOConfig = DPOConfig()
    torch_threads: int = Field(
        0, ge=0, description="CPU threads for torch during the pipeline (0: leave torch's default); "
        "1 is fastest for small models on a busy CPU"
    )

    @model_validator(mode="after")
    def _export_was_trained(self) -> "RLHFTrainingConfig":
        if self.export != "auto" and self.method not in (self.export, "both"):
            raise ValueError(f"export: {self.export} is not trained with method: {self.method}")
        return self


class RLHFDataConfig(StrictModel):
    # Check the default paths too: a config that leaves them out still needs the files.
    model_config = ConfigDict(**StrictModel.model_config, validate_default=True)

    sft_train_file: ExistingFile = Path("data/sft_train.jsonl")
    # val selects checkpoints and tunes settings; test is reported, and nothing else.
    sft_val_file: ExistingFile = Path("data/sft_val.jsonl")
    sft_test_file: ExistingFile = Path("data/sft_test.jsonl")
    preferences_train_file: ExistingFile = Path("data/preferences_train.jsonl")
    preferences_val_file: ExistingFile = Path("data/preferences_val.jsonl")
    preferences_test_file: ExistingFile = Path("data/preferences_test.jsonl")


class RLHFPathsConfig(PathsConfig):
    checkpoint_dir: Path = Field(Path("checkpoints/rlhf"), description="--output-dir: every stage's output file")
    log_dir: Path = Field(Path("logs/rlhf"), description="logs/rlhf/<stage>/train.log and metrics.jsonl")


class RLHFConfig(StrictModel):
    """``configs/rlhf.yaml`` (or the ``rlhf:`` section of ``configs/rl_train.yaml``)."""

    model: RLHFModelConfig = RLHFModelConfig()
    training: RLHFTrainingConfig = RLHFTrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    # A factory, not an instance: the file checks must run when a config is loaded, not at import.
    data: RLHFDataConfig = Field(default_factory=RLHFDataConfig)
    paths: RLHFPathsConfig = RLHFPathsConfig()
    system: SystemConfig = SystemConfig()


StageName = Literal["sft", "reward", "ppo", "dpo", "evaluation", "export"]


class StageConfig(StrictModel):
    """What one stage runs with; ``fit`` reads ``training``, ``paths`` and ``system`` from it.

    ``training``: the stage's own typed config; ``paths.checkpoint_dir``: its working folder
    (resumable checkpoints); ``paths.log_dir``: ``logs/rlhf/<stage>``; ``output_file``: the file
    it delivers (``sft_model.pt`` ...); ``inputs``: sha256 of every file it starts from, so a
    finished output or a checkpoint is only reused for the same inputs.
    """

    stage: StageName
    training: SerializeAsAny[Union[SFTConfig, RewardConfig, PPOConfig, DPOConfig, EvaluationConfig, StrictModel]]
    model: RLHFModelConfig
    paths: PathsConfig
    system: SystemConfig
    output_file: Path
    inputs: dict[str, str] = Field(default_factory=dict)


def load_rlhf_config(path: str | Path, overrides: list[str] | None = None) -> RLHFConfig:
    """The :class:`RLHFConfig` for ``--config path`` (the file's ``rlhf:`` section when
    it has one; a file that is itself an RLHF config; else ``rlhf.yaml`` beside it, else
    ``configs/rlhf.yaml``), with ``key.sub=value`` overrides. Errors are one-line ``ConfigError``s."""
    path = Path(path)
    raw = read_config_file(path)
    if "rlhf" in raw:
        section = raw["rlhf"] or {}
        source = f"{path} (rlhf section)"
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: must be a mapping of sections")
        apply_overrides(section, overrides, source)
        return validate_config(section, RLHFConfig, source)
    if set(raw) <= set(RLHFConfig.model_fields):
        return load_config(path, RLHFConfig, overrides)
    beside = path.parent / RLHF_CONFIG_NAME
    fallback = beside if beside.is_file() else CONFIG_DIR / RLHF_CONFIG_NAME
    log.info("%s has no rlhf section: reading the RLHF settings from %s", path, fallback)
    return load_config(fallback, RLHFConfig, overrides)
