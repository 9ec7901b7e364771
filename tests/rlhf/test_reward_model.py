"""The reward model (src/rlhf/reward_model.py): Bradley-Terry loss, last-token scores,
learning a trivially separable preference set, save and load."""

import pytest
import torch
import torch.nn.functional as F

from src.core.config import PathsConfig, SystemConfig
from src.data.readers import PreferenceExample, read_sft
from src.mamba.load import load_mamba
from src.rlhf.config import RewardConfig, RLHFModelConfig, StageConfig
from src.rlhf.data import PromptFormat, collate_preferences
from src.rlhf.reward_model import RewardModel, load_reward_model, pairwise_loss, pairwise_metrics, train_reward_model


def test_pairwise_loss_is_bradley_terry(tiny_base_model):
    lm, tok = load_mamba(tiny_base_model)
    model = RewardModel(lm)
    fmt = PromptFormat(tok)
    items = [(fmt.prompt_ids("What is x?"), fmt.response_ids("A thing."), fmt.response_ids("Nothing at all, really.")),
             (fmt.prompt_ids("What does y do?"), fmt.response_ids("Runs."), fmt.response_ids("No."))]
    batch = collate_preferences(items, tok.pad_id)
    scores = model(batch["input_ids"], batch["lengths"])
    expected = -F.logsigmoid(scores[:2] - scores[2:]).mean()
    assert torch.isclose(pairwise_loss(model, batch), expected)


def test_score_reads_the_last_real_token_whatever_the_padding(tiny_base_model):
    lm, tok = load_mamba(tiny_base_model)
    model = RewardModel(lm).eval()
    short, long = [1, 40, 41, 2], [1, 50, 51, 52, 53, 54, 2]
    together = model.score_sequences([short, long], tok.pad_id)
    alone = torch.cat([model.score_sequences([short], tok.pad_id), model.score_sequences([long], tok.pad_id)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_pairwise_metrics_count_ties_half():
    metrics = pairwise_metrics({"chosen": [2.0, 0.0, 1.0, 5.0], "rejected": [1.0, 0.0, 3.0, 1.0]})
    assert metrics["val_accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert metrics["val_margin"] == pytest.approx((1 + 0 - 2 + 4) / 4)


def test_reward_model_learns_a_separable_preference_set(tiny_base_model, sample_data_dir, tmp_path):
    lm, tok = load_mamba(tiny_base_model)
    prompts = [e.prompt for e in read_sft(sample_data_dir / "sft_train.jsonl")[:96]]
    # Chosen answers state the topic; rejected ones are a fixed non-answer: separable by content.
    pairs = [PreferenceExample(prompt=p, chosen=f"It is about {p.split()[2].split('.')[0]}.", rejected="It does what its name says.")
             for p in prompts]
    stage = StageConfig(
        stage="reward",
        training=RewardConfig(batch_size=8, num_epochs=2, learning_rate=0.002, normalization_examples=16, log_steps=4),
        model=RLHFModelConfig(max_prompt_tokens=24, max_response_tokens=16),
        paths=PathsConfig(checkpoint_dir=tmp_path / "reward", log_dir=tmp_path / "logs"),
        system=SystemConfig(device="cpu", seed=0),
        output_file=tmp_path / "reward_model.pt",
        inputs={"backbone": "test"},
    )
    summary = train_reward_model(lm, tok, pairs[:64], pairs[64:], stage)
    assert summary["metrics"]["val_accuracy"] >= 0.9, summary["metrics"]  # chance is 0.5

    model, loaded_tok = load_reward_model(tmp_path / "reward_model.pt")
    assert loaded_tok.fingerprint() == tok.fingerprint()
    assert float(model.score_std) == pytest.approx(summary["metrics"]["score_std"])
    fmt = PromptFormat(tok, max_prompt_tokens=24, max_response_tokens=16)
    prompt = fmt.prompt_ids(prompts[70])
    chosen, rejected = model.score_sequences(
        [prompt + fmt.response_ids(pairs[70].chosen), prompt + fmt.response_ids(pairs[70].rejected)], tok.pad_id
    )
    assert chosen > rejected
