"""DPO (src/rlhf/dpo.py): the loss on hand-computed values, the reference log-probs, and a
tiny DPO run through the engine that learns to prefer the chosen answers."""

import importlib
import math

import pytest
import torch

from src.core.config import PathsConfig, SystemConfig
from src.data.readers import PreferenceExample, read_sft
from src.mamba import native
from src.mamba.generate import Decoder, default_decoder
from src.mamba.load import load_mamba
from src.mamba.model import MambaLM
from src.rlhf.config import DPOConfig, EvaluationConfig, RLHFModelConfig, StageConfig
from src.rlhf.data import PreferenceDataset, PromptFormat
from src.rlhf.dpo import collate_dpo, dpo_loss, implicit_reward_accuracy, make_loss, reference_logprobs, rpo_nll, sampled_pairs, sequence_logprobs, train_dpo
from src.rlhf.evaluate import sample_responses
from src.rlhf.ppo import response_logprobs, reward_scores
from src.rlhf.reward_model import RewardModel


generate_module = importlib.import_module("src.mamba.generate")  # src.mamba.generate is also the function's name


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


def test_rpo_alpha_adds_the_chosen_answers_mean_token_nll(tiny_base_model):
    """``rpo_alpha`` (RPO; TRL's key): loss = DPO + alpha x (-log pi(chosen) / chosen tokens),
    checked by hand on numbers and through ``make_loss`` on a real batch; null leaves plain DPO."""
    assert rpo_nll(torch.tensor([-6.0, -1.5]), torch.tensor([3, 1])).tolist() == [2.0, 1.5]
    lm, tok = load_mamba(tiny_base_model)
    fmt = PromptFormat(tok, max_prompt_tokens=24, max_response_tokens=16)
    pairs = PreferenceDataset([PreferenceExample(prompt="What does json.dumps do?", chosen="Serialize obj to a JSON string.",
                                                 rejected="It does what its name says.")], fmt)
    ref = reference_logprobs(lm, pairs, tok.pad_id)
    batch = collate_dpo([(*pairs[0], float(ref[0, 0]), float(ref[0, 1]))], tok.pad_id)
    with torch.no_grad():
        plain = float(make_loss(DPOConfig(beta=0.1))(lm, batch))
        rpo = float(make_loss(DPOConfig(beta=0.1, rpo_alpha=0.5))(lm, batch))
        chosen_logp = float(sequence_logprobs(lm, batch)[0])
    assert plain == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert rpo == pytest.approx(plain + 0.5 * -chosen_logp / len(pairs[0][1]), abs=1e-5)


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


def test_sampled_pairs_are_the_policys_best_and_worst_answers_under_the_reward_model(tiny_base_model, sample_data_dir, tmp_path):
    """``pairs: sampled``: per prompt, ``num_samples`` answers of the SFT model; chosen is the
    one the reward model (a real Mamba-backbone RM with its fresh head) scores highest, rejected
    the lowest, re-checked by scoring them again; the same seed gives the same pairs; a tiny
    DPO run on such pairs learns to rank its val pairs."""
    lm, tok = load_mamba(tiny_base_model)
    torch.manual_seed(0)
    reward_model = RewardModel(load_mamba(tiny_base_model)[0]).eval()
    fmt = PromptFormat(tok, max_prompt_tokens=24, max_response_tokens=16)
    prompts = [e.prompt for e in read_sft(sample_data_dir / "sft_train.jsonl")[:40]]
    cfg = DPOConfig(pairs="sampled", num_samples=3, sample_max_new_tokens=8, missing_eos_penalty=0.5)
    pairs, stats = sampled_pairs(lm, reward_model, fmt, prompts[:12], cfg, seed=3, batch_size=8)
    assert stats["prompts"] == len(dict.fromkeys(prompts[:12])) == len(pairs) == stats["pairs"]
    assert stats["chosen_score_mean"] > stats["score_mean"] > stats["rejected_score_mean"]
    prompt_ids = [p for p, _, _ in pairs.items]
    chosen = reward_scores(reward_model, prompt_ids, [c for _, c, _ in pairs.items], tok, cfg.missing_eos_penalty)[0]
    rejected = reward_scores(reward_model, prompt_ids, [r for _, _, r in pairs.items], tok, cfg.missing_eos_penalty)[0]
    assert bool((chosen >= rejected - 1e-5).all()) and float((chosen - rejected).mean()) > 0
    assert all(1 <= len(c) <= 8 and 1 <= len(r) <= 8 for _, c, r in pairs.items)
    again, _ = sampled_pairs(lm, reward_model, fmt, prompts[:12], cfg, seed=3, batch_size=8)
    assert again.items == pairs.items
    # A large gap requirement drops the prompts whose answers score alike.
    assert len(sampled_pairs(lm, reward_model, fmt, prompts[:12], cfg.model_copy(update={"min_score_gap": 1e9}), seed=3)[0]) == 0

    train, val = [PreferenceExample(prompt=p, chosen="-", rejected="-") for p in prompts[:32]], \
        [PreferenceExample(prompt=p, chosen="-", rejected="-") for p in prompts[32:]]
    reference, _ = load_mamba(tiny_base_model)
    stage = StageConfig(
        stage="dpo", training=cfg.model_copy(update={"batch_size": 8, "num_epochs": 3, "learning_rate": 0.003, "beta": 0.5,
                                                      "log_steps": 4, "eval_steps": 4}),
        model=RLHFModelConfig(max_prompt_tokens=24, max_response_tokens=16),
        paths=PathsConfig(checkpoint_dir=tmp_path / "dpo", log_dir=tmp_path / "logs"),
        system=SystemConfig(device="cpu", seed=0), output_file=tmp_path / "dpo_policy.pt", inputs={"sft_model": "test"},
    )
    summary = train_dpo(lm, reference, tok, train, val, stage, reward_model=reward_model)
    metrics = summary["metrics"]
    assert metrics["pairs"] == "sampled" and metrics["sampled_pairs"]["train"]["pairs"] == len(dict.fromkeys(prompts[:32]))
    assert metrics["val_loss"] < math.log(2) and metrics["val_reward_accuracy"] > 0.5, metrics
    with pytest.raises(ValueError, match="reward model"):
        train_dpo(lm, reference, tok, train, val, stage)


def test_dpo_with_an_adapter_uses_the_policy_with_its_adapter_disabled_as_reference(tiny_base_model, sample_data_dir, tmp_path):
    """model.adapter: no second model; the reference log-probs are those of a frozen copy, and
    training moves only the adapter (src/training/adapters.py)."""
    from src.core.checkpoint import file_sha256, load_checkpoint
    from src.training.adapters import AdapterConfig, apply_adapter, frozen_reference

    lm, tok = load_mamba(tiny_base_model)
    frozen, _ = load_mamba(tiny_base_model)
    base_weights = {k: v.clone() for k, v in lm.state_dict().items()}
    apply_adapter(lm, AdapterConfig(r=4, target_modules=["in_proj", "out_proj"]),
                  base={"checkpoint": str(tiny_base_model), "sha256": file_sha256(tiny_base_model)})
    with torch.no_grad():  # a trained-looking adapter: the policy now differs from its base
        for name, param in lm.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    prompts = [e.prompt for e in read_sft(sample_data_dir / "sft_train.jsonl")[:40]]
    pairs = [PreferenceExample(prompt=p, chosen=f"It is about {p.split()[2].split('.')[0]}.", rejected="It does what its name says.")
             for p in prompts]
    fmt = PromptFormat(tok, max_prompt_tokens=24, max_response_tokens=16)
    dataset = PreferenceDataset(pairs, fmt)
    with frozen_reference(lm) as reference:
        disabled = reference_logprobs(reference, dataset, tok.pad_id)
    assert torch.equal(disabled, reference_logprobs(frozen, dataset, tok.pad_id))
    assert not torch.allclose(reference_logprobs(lm, dataset, tok.pad_id), disabled, atol=1e-3)  # the adapter is back on

    cfg = DPOConfig(batch_size=8, num_epochs=2, learning_rate=0.01, beta=0.5, log_steps=4)
    stage = StageConfig(
        stage="dpo", training=cfg, model=RLHFModelConfig(max_prompt_tokens=24, max_response_tokens=16),
        paths=PathsConfig(checkpoint_dir=tmp_path / "dpo", log_dir=tmp_path / "logs"),
        system=SystemConfig(device="cpu", seed=0), output_file=tmp_path / "dpo_policy.pt", inputs={"sft_model": "test"},
    )
    summary = train_dpo(lm, None, tok, pairs[:32], pairs[32:], stage)
    assert summary["metrics"]["val_reward_accuracy"] >= 0.9, summary["metrics"]
    trained = lm.state_dict()
    for key, value in base_weights.items():  # the frozen base, bitwise
        assert torch.equal(trained.get(key.replace("proj.weight", "proj.base_layer.weight"), trained.get(key)), value), key
    assert all(".lora_" in k for k in load_checkpoint(tmp_path / "dpo_policy.pt")["model"])
    policy, _ = load_mamba(tmp_path / "dpo_policy.pt")  # base checkpoint + adapter
    after = implicit_reward_accuracy(policy, frozen, pairs[32:], fmt, cfg)
    assert after["val_loss"] == pytest.approx(summary["metrics"]["val_loss"], abs=1e-5)


@pytest.mark.skipif(not native.available()[0], reason="the native kernel cannot be built here")
def test_native_kernel_and_eager_decoding_give_the_same_rlhf_samples_for_a_fixed_seed(tiny_base_model, sample_data_dir, monkeypatch):
    """DPO's sampled pairs and the evaluation's answers decode with the native kernel by
    default (the eager step never runs); with the eager step forced instead they are the same
    token for token: one generator, the same draws, on the same logits."""
    lm, tok = load_mamba(tiny_base_model)
    torch.manual_seed(0)
    reward_model = RewardModel(load_mamba(tiny_base_model)[0]).eval()
    fmt = PromptFormat(tok, max_prompt_tokens=24, max_response_tokens=16)
    prompts = [e.prompt for e in read_sft(sample_data_dir / "sft_train.jsonl")[:10]]
    cfg = DPOConfig(pairs="sampled", num_samples=3, sample_max_new_tokens=12)
    eval_cfg = EvaluationConfig(max_new_tokens=12, batch_size=4, temperature=1.0)
    prompt_ids = [fmt.prompt_ids(p) for p in prompts]
    steps = []
    eager_step = MambaLM.step_
    monkeypatch.setattr(MambaLM, "step_", lambda self, *a, **k: steps.append(1) or eager_step(self, *a, **k))

    assert default_decoder(lm).backend == "native"
    native_pairs, native_stats = sampled_pairs(lm, reward_model, fmt, prompts, cfg, seed=7, batch_size=8)
    native_answers = sample_responses(lm, prompt_ids, eval_cfg, tok.eos_id, seed=7)
    assert steps == []
    monkeypatch.setattr(generate_module, "default_decoder", lambda model: Decoder(model, "eager"))
    eager_pairs, eager_stats = sampled_pairs(lm, reward_model, fmt, prompts, cfg, seed=7, batch_size=8)
    eager_answers = sample_responses(lm, prompt_ids, eval_cfg, tok.eos_id, seed=7)
    assert steps  # this time the eager step decoded
    assert native_pairs.items == eager_pairs.items and native_stats == eager_stats
    assert native_answers == eager_answers
    assert len({tuple(a) for a in native_answers}) > 1  # sampled, not all alike
