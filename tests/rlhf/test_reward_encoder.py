"""The encoder reward model (src/rlhf/reward_encoder.py): it learns a separable toy preference
set, scores decoded policy text like plain text, and loads back through load_reward_model."""

import pytest
import torch

from src.core.config import PathsConfig, SystemConfig
from src.core.errors import ConfigError
from src.data.readers import PreferenceExample, read_sft
from src.mamba.load import load_mamba
from src.rlhf.config import RewardConfig, RLHFModelConfig, StageConfig
from src.rlhf.data import PromptFormat
from src.rlhf.evaluate import preference_baselines
from src.rlhf.ppo import reward_scores
from src.rlhf.reward_encoder import EncoderRewardModel, evaluate_text_pairs, load_encoder, train_encoder_reward_model
from src.rlhf.load import load_reward_model


def _toy_pairs(sample_data_dir, n: int) -> list[PreferenceExample]:
    prompts = [e.prompt for e in read_sft(sample_data_dir / "sft_train.jsonl")[:n]]
    # Chosen answers name the prompt's module; rejected ones are a fixed non-answer: separable by content.
    return [PreferenceExample(prompt=p, chosen=f"It is about {p.split()[2].split('.')[0]}.", rejected="It does what its name says.")
            for p in prompts]


def test_encoder_reward_model_learns_a_separable_preference_set(tiny_encoder_dir, tiny_base_model, sample_data_dir, tmp_path):
    pairs = _toy_pairs(sample_data_dir, 96)
    stage = StageConfig(
        stage="reward",
        training=RewardConfig(backbone="encoder", encoder_model=str(tiny_encoder_dir), max_length=48, batch_size=8,
                              num_epochs=2, learning_rate=0.002, normalization_examples=16, log_steps=4),
        model=RLHFModelConfig(), paths=PathsConfig(checkpoint_dir=tmp_path / "reward", log_dir=tmp_path / "logs"),
        system=SystemConfig(device="cpu", seed=0), output_file=tmp_path / "reward_model.pt", inputs={"encoder": "tiny"},
    )
    summary = train_encoder_reward_model(pairs[:64], pairs[64:], stage)
    assert summary["metrics"]["val_accuracy"] == 1.0, summary["metrics"]  # chance is 0.5
    assert summary["metrics"]["backbone"] == "encoder"

    model, tokenizer = load_reward_model(tmp_path / "reward_model.pt")
    assert isinstance(model, EncoderRewardModel) and model.backbone == "encoder"
    assert float(model.score_std) == pytest.approx(summary["metrics"]["score_std"])
    assert evaluate_text_pairs(model, pairs[64:])["val_accuracy"] == 1.0
    chosen, rejected = model.score_texts([pairs[70].prompt] * 2, [pairs[70].chosen, pairs[70].rejected])
    assert chosen > rejected

    # A policy's ids are decoded and read as the same text.
    mamba_tok = load_mamba(tiny_base_model)[1]
    fmt = PromptFormat(mamba_tok, max_prompt_tokens=48, max_response_tokens=32)
    prompt_ids = [fmt.prompt_ids(pairs[70].prompt)] * 2
    response_ids = [fmt.response_ids(pairs[70].chosen), fmt.response_ids(pairs[70].rejected)]
    via_ids = model.score_responses(prompt_ids, response_ids, mamba_tok)
    assert via_ids.tolist() == pytest.approx(torch.stack([chosen, rejected]).tolist(), abs=1e-5)
    scores, truncated = reward_scores(model, prompt_ids, response_ids, mamba_tok)
    assert scores[0] > scores[1] and not truncated.any()


def test_preference_baselines_on_hand_made_pairs():
    pairs = [PreferenceExample(prompt="What does json.dumps do?", chosen="Serialize obj to a JSON formatted str.", rejected="No."),
             PreferenceExample(prompt="What does csv.reader do?", chosen="Read CSV rows.", rejected="It does what its name says, always.")]
    baselines = preference_baselines(pairs, cosine_model=None)
    assert baselines == {"random": 0.5, "length": 0.5}
    assert 0.0 <= preference_baselines(pairs)["cosine"] <= 1.0


def test_a_shallower_encoder_with_frozen_lower_layers_trains_and_reloads(tiny_encoder_dir, sample_data_dir, tmp_path):
    """``encoder_layers`` keeps the encoder's first N layers (and the checkpoint remembers it),
    ``frozen_layers`` leaves the embeddings and the first N layers untouched by training;
    asking for more layers than the encoder has is a one-line config error."""
    pairs = _toy_pairs(sample_data_dir, 96)

    def stage(**reward) -> StageConfig:
        return StageConfig(
            stage="reward",
            training=RewardConfig(backbone="encoder", encoder_model=str(tiny_encoder_dir), max_length=48, batch_size=8,
                                  num_epochs=2, learning_rate=0.002, normalization_examples=16, log_steps=4, **reward),
            model=RLHFModelConfig(), paths=PathsConfig(checkpoint_dir=tmp_path / "reward", log_dir=tmp_path / "logs"),
            system=SystemConfig(device="cpu", seed=0), output_file=tmp_path / "reward_model.pt", inputs={"encoder": "tiny"},
        )

    pretrained, _ = load_encoder(str(tiny_encoder_dir))
    summary = train_encoder_reward_model(pairs[:64], pairs[64:], stage(encoder_layers=1, frozen_layers=1))
    assert summary["metrics"]["val_accuracy"] > 0.5  # the last layer is frozen too: only the head learned
    model, _ = load_reward_model(tmp_path / "reward_model.pt")
    assert model.encoder.config.num_hidden_layers == 1 and len(model.encoder.encoder.layer) == 1
    kept = dict(model.encoder.named_parameters())
    for name, before in pretrained.named_parameters():
        if name.startswith("embeddings.") or ".layer.0." in name:
            assert torch.equal(kept[name], before), name  # frozen: the pretrained weights, unchanged
    assert evaluate_text_pairs(model, pairs[64:])["val_accuracy"] == summary["metrics"]["val_accuracy"]

    with pytest.raises(ConfigError, match="encoder_layers: 5, but .* has 2 layers"):
        train_encoder_reward_model(pairs[:8], pairs[8:12], stage(encoder_layers=5))
    with pytest.raises(ConfigError, match="frozen_layers: 3, but the encoder has 2 layers"):
        train_encoder_reward_model(pairs[:8], pairs[8:12], stage(frozen_layers=3))


def test_a_reward_model_trained_in_bf16_is_scored_in_bf16(tiny_encoder_dir, sample_data_dir, tmp_path):
    """``training.reward.mixed_precision: bf16`` trains under bf16 autocast; the checkpoint
    remembers it, so PPO, DPO and the evaluation score the way the engine validated: the
    reloaded model's val accuracy is the engine's, and its scores are within bf16 rounding
    of the same weights scored in fp32."""
    pairs = _toy_pairs(sample_data_dir, 96)
    stage = StageConfig(
        stage="reward",
        training=RewardConfig(backbone="encoder", encoder_model=str(tiny_encoder_dir), max_length=48, batch_size=8, num_epochs=2,
                              learning_rate=0.002, normalization_examples=16, log_steps=4, mixed_precision="bf16"),
        model=RLHFModelConfig(), paths=PathsConfig(checkpoint_dir=tmp_path / "reward", log_dir=tmp_path / "logs"),
        system=SystemConfig(device="cpu", seed=0), output_file=tmp_path / "reward_model.pt", inputs={"encoder": "tiny"},
    )
    summary = train_encoder_reward_model(pairs[:64], pairs[64:], stage)
    model, _ = load_reward_model(tmp_path / "reward_model.pt")
    assert model.precision == "bf16"
    assert evaluate_text_pairs(model, pairs[64:])["val_accuracy"] == summary["metrics"]["val_accuracy"] == 1.0
    prompts, answers = [p.prompt for p in pairs[64:]], [p.chosen for p in pairs[64:]]
    bf16 = model.score_texts(prompts, answers)
    model.precision = "fp32"
    fp32 = model.score_texts(prompts, answers)
    assert not torch.equal(bf16, fp32) and torch.allclose(bf16, fp32, atol=0.05 * float(fp32.abs().max()) + 1e-3)
