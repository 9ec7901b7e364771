"""DPO (src/rlhf/dpo.py): the loss on hand-computed values, the reference log-probs, and a
tiny DPO run through the engine that learns to prefer the chosen answers."""

import math

import pytest
import torch

from src.core.config import PathsConfig, SystemConfig
from src.data.readers import PreferenceExample, read_sft
from src.mamba.load import load_mamba
from src.rlhf.config import DPOConfig, RLHFModelConfig, StageConfig
from src.rlhf.data import PreferenceDataset, PromptFormat
from src.rlhf.dpo import collate_dpo, dpo_loss, implicit_reward_accuracy, reference_logprobs, sequence_logprobs, train_dpo
from src.rlhf.ppo import response_logprobs


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_matches_hand_computed_values():
    # Pair 1: policy moved towards chosen (+1.0 - (-0.5) = 1.5 nats of margin); pair 2: the wrong way.
    pc, pr = torch.tensor([-10.0, -8.0]), torch.tensor([-12.5, -7.0])
    rc, rr = torch.tensor([-11.0, -8.0]), torch.tensor([-12.0, -8.0])
    losses, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # d = (pc - rc) - (pr - rr): 1.0 - (-0.5) = 1.5 and 0.0 - 1.0 = -1.0
    assert losses.tolist() == pytest.approx([-_log_sigmoid(0.75), -_log_sigmoid(-0.5)], abs=1e-6)
    assert losses.tolist() == pytest.approx([0.3868710, 0.9740770], abs=1e-6)  # by hand: log(1 + e^-0.75), log(1 + e^0.5)
    assert chosen_reward.tolist() == pytest.approx([0.5, 0.0]) and rejected_reward.tolist() == pytest.approx([-0.25, 0.5])


def test_label_smoothing_is_conservative_dpo():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    # d = 1 - (-1) = 2; beta * d = 0.2
    expected = -0.8 * _log_sigmoid(0.2) - 0.2 * _log_sigmoid(-0.2)
    assert float(losses[0]) == pytest.approx(expected, abs=1e-6)
    assert float(dpo_loss(pc, pr, rc, rr, beta=0.1)[0][0]) == pytest.approx(-_log_sigmoid(0.2), abs=1e-6)
    # At the start of training (policy == reference) every pair costs log 2, whatever the smoothing.
    assert float(dpo_loss(pc, pr, pc, pr, beta=0.3, label_smoothing=0.1)[0][0]) == pytest.approx(math.log(2))


def test_sequence_logprobs_sum_the_response_tokens_only(tiny_base_model):
    lm, tok = load_mamba(tiny_base_model)
    fmt = PromptFormat(tok, max_prompt_tokens=24, max_response_tokens=16)
    pairs = PreferenceDataset([PreferenceExample(prompt="What does json.dumps do?", chosen="Serialize obj to a JSON string.",
                                                 rejected="It does what its name says.")], fmt)
    batch = collate_dpo([pairs[0]], tok.pad_id)
    with torch.no_grad():
        summed = sequence_logprobs(lm, batch)
        prompt, chosen, _ = pairs[0]
        ids = torch.tensor([prompt + chosen])
        logits = lm(ids).logits[0].log_softmax(-1)
        by_hand = sum(float(logits[len(prompt) - 1 + j, t]) for j, t in enumerate(chosen))
    assert float(summed[0]) == pytest.approx(by_hand, abs=1e-4)
    assert reference_logprobs(lm, pairs, tok.pad_id).shape == (1, 2)
    # response_logprobs is what PPO uses: the same numbers.
    with torch.no_grad():
        lp, _, _ = response_logprobs(lm, batch["input_ids"], batch["positions"], batch["targets"])
    assert float((lp * batch["mask"]).sum(-1)[0]) == pytest.approx(float(summed[0]), abs=1e-5)


def test_dpo_learns_to_prefer_the_chosen_answers(tiny_base_model, sample_data_dir, tmp_path):
    lm, tok = load_mamba(tiny_base_model)
    reference, _ = load_mamba(tiny_base_model)
    prompts = [e.prompt for e in read_sft(sample_data_dir / "sft_train.jsonl")[:48]]
    pairs = [PreferenceExample(prompt=p, chosen=f"It is about {p.split()[2].split('.')[0]}.", rejected="It does what its name says.")
             for p in prompts]
    cfg = DPOConfig(batch_size=8, num_epochs=2, learning_rate=0.003, beta=0.5, log_steps=4)
    stage = StageConfig(
        stage="dpo", training=cfg, model=RLHFModelConfig(max_prompt_tokens=24, max_response_tokens=16),
        paths=PathsConfig(checkpoint_dir=tmp_path / "dpo", log_dir=tmp_path / "logs"),
        system=SystemConfig(device="cpu", seed=0), output_file=tmp_path / "dpo_policy.pt", inputs={"sft_model": "test"},
    )
    fmt = PromptFormat(tok, max_prompt_tokens=24, max_response_tokens=16)
    before = implicit_reward_accuracy(lm, reference, pairs[32:], fmt, cfg)
    assert before["val_reward_accuracy"] == 0.5 and before["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    summary = train_dpo(lm, reference, tok, pairs[:32], pairs[32:], stage)
    assert summary["metrics"]["val_reward_accuracy"] >= 0.9, summary["metrics"]
    assert summary["metrics"]["val_loss"] < math.log(2)
    trained, _ = load_mamba(tmp_path / "dpo_policy.pt")
    after = implicit_reward_accuracy(trained, reference, pairs[32:], fmt, cfg)
    assert after["val_loss"] == pytest.approx(summary["metrics"]["val_loss"], abs=1e-5)
