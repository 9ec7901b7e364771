"""The parts of PPO (src/rlhf/ppo.py) against hand computations: GAE, the KL estimate and
rewards, the clipped objective, the KL controllers, log-prob alignment and the update."""

import importlib
import math

import pytest
import torch

from src.mamba import native
from src.mamba.generate import Decoder, token_logprobs
from src.mamba.load import load_mamba
from src.rlhf.config import PPOConfig
from src.rlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PolicyWithValueHead,
    Rollout,
    _prompt_order,
    build_response_batch,
    collect_rollout,
    compute_gae,
    compute_rewards,
    masked_mean,
    masked_whiten,
    per_token_kl,
    ppo_loss,
    ppo_update,
    response_logprobs,
    scored_sequences,
    sequence_kl,
)

generate_module = importlib.import_module("src.mamba.generate")  # src.mamba.generate is also the function's name


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    # gamma 1, lambda 0.9: deltas (0.1, 0.1, 0.3); A2 = 0.3, A1 = 0.1 + 0.9 * 0.3, A0 = 0.1 + 0.9 * A1
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.9)
    assert torch.allclose(advantages, torch.tensor([[0.433, 0.37, 0.3]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.933, 0.97, 1.0]]), atol=1e-6)
    # gamma 0.5, lambda 1: deltas (0.5*0.6-0.5, 0.5*0.7-0.6, 1-0.7) = (-0.2, -0.25, 0.3)
    advantages, _ = compute_gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert torch.allclose(advantages, torch.tensor([[-0.25, -0.1, 0.3]]), atol=1e-6)


def test_gae_ignores_padding_after_a_short_response():
    rewards = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 9.0], [0.5, 0.6, 0.7]])  # 9.0 and 5.0 sit on padding
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # row 0 ends after 2 tokens: A1 = 1 - 0.6, A0 = (0.6 - 0.5) + 0.9 * A1
    assert torch.allclose(advantages[0], torch.tensor([0.46, 0.4, 0.0]), atol=1e-6)
    assert torch.allclose(returns[0], torch.tensor([0.96, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(advantages[1], torch.tensor([0.433, 0.37, 0.3]), atol=1e-6)


def test_per_token_kl_estimates_the_kl_divergence():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), -1)
    q = torch.softmax(torch.randn(6), -1)
    exact = float((p * (p.log() - q.log())).sum())
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = float(per_token_kl(p.log()[samples], q.log()[samples]).mean())
    assert estimate == pytest.approx(exact, abs=0.02)
    assert per_token_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0


def test_sequence_kl_sums_over_real_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert sequence_kl(logprobs, ref, mask).tolist() == [pytest.approx(0.5 - 1.0)]


def test_rewards_are_kl_penalty_per_token_plus_score_at_the_last_token():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.5], [-1.0, -1.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, penalty = compute_rewards(torch.tensor([2.0, 3.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(penalty, torch.tensor([[-0.1, 0.0, -0.05], [0.0, 0.1, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.1, 0.0, 1.95], [0.0, 3.1, 0.0]]))


def _loss(advantage: float, ratio: float, clip: float = 0.2):
    old = torch.tensor([[-1.0]])
    new = (old + math.log(ratio)).requires_grad_(True)
    zero = torch.zeros(1, 1)
    loss, stats = ppo_loss(new, old, torch.tensor([[advantage]]), zero, zero, zero, torch.ones(1, 1), clip, 0.2, 0.0)
    loss.backward()
    return loss.item(), new.grad.item(), stats


def test_clipped_objective():
    # A > 0 and ratio above 1 + eps: clipped, no gradient pushes the ratio further.
    loss, grad, stats = _loss(advantage=1.0, ratio=1.5)
    assert loss == pytest.approx(-1.2) and grad == 0.0 and stats["pg_clipfrac"] == 1.0
    # A < 0 and ratio above 1 + eps: the unclipped (pessimistic) term wins, gradient flows.
    loss, grad, stats = _loss(advantage=-1.0, ratio=1.5)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5) and stats["pg_clipfrac"] == 0.0
    # A > 0 and ratio below 1 - eps: unclipped too (pessimistic), gradient -A * ratio.
    loss, grad, _ = _loss(advantage=1.0, ratio=0.5)
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5)
    # Inside the trust region: plain policy gradient.
    loss, grad, stats = _loss(advantage=2.0, ratio=1.1)
    assert loss == pytest.approx(-2.2) and grad == pytest.approx(-2.2) and stats["ratio"] == pytest.approx(1.1)


def test_value_loss_is_clipped_around_the_old_value():
    zero = torch.zeros(1, 1)
    values = torch.tensor([[1.0]], requires_grad=True)
    loss, stats = ppo_loss(zero, zero, zero, values, zero, torch.tensor([[1.0]]), torch.ones(1, 1), 0.2, 0.2, vf_coef=1.0)
    # clipped prediction 0.2: max((1 - 1)^2, (0.2 - 1)^2) / 2
    assert loss.item() == pytest.approx(0.32) and stats["vf_clipfrac"] == 1.0


def test_masked_positions_do_not_count():
    mask = torch.tensor([[1.0, 0.0]])
    advantages = torch.tensor([[1.0, 100.0]])
    old = torch.zeros(1, 2)
    loss, _ = ppo_loss(old, old, advantages, old, old, old, mask, 0.2, 0.2, 0.0)
    assert loss.item() == pytest.approx(-1.0)
    assert masked_mean(torch.tensor([[2.0, 7.0]]), mask).item() == 2.0


def test_masked_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    white = masked_whiten(values, mask)
    real = white[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert (real**2).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert white[1, 1:].tolist() == [0.0, 0.0]


def test_adaptive_kl_controller_follows_ziegler_et_al():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(current_kl=12.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    before = ctl.value
    ctl.update(current_kl=6.0, n_steps=10)  # on target: unchanged
    assert ctl.value == pytest.approx(before)
    ctl.update(current_kl=4.5, n_steps=20)  # error -0.25 clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 20 / 100))
    ctl.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert ctl.value == pytest.approx(before * 0.96 * 0.9)
    restored = AdaptiveKLController(0.5, 6.0, 100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05


def test_response_batch_positions_and_masks():
    batch = build_response_batch([[1, 5, 6], [1, 7]], [[8, 9], [10, 11, 2]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 8, 9], [1, 7, 10, 11, 2]]
    assert batch.targets.tolist() == [[8, 9, 0], [10, 11, 2]]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    # position p predicts token p + 1
    assert batch.positions[0, :2].tolist() == [2, 3] and batch.positions[1].tolist() == [1, 2, 3]
    sequences, truncated = scored_sequences([[1, 5], [1, 7]], [[8, 9], [10, 2]], eos_id=2)
    assert sequences == [[1, 5, 8, 9, 2], [1, 7, 10, 2]] and truncated.tolist() == [True, False]


def test_response_logprobs_match_the_models_token_logprobs(tiny_base_model):
    lm, _ = load_mamba(tiny_base_model)
    prompts, responses = [[1, 40, 41, 42], [1, 50]], [[60, 61], [70, 71, 72, 2]]
    batch = build_response_batch(prompts, responses, pad_id=0)
    with torch.no_grad():
        logprobs, entropy, _ = response_logprobs(lm, batch.input_ids, batch.positions, batch.targets)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            full = token_logprobs(lm, torch.tensor([prompt + response]))[0]
            expected = full[len(prompt) - 1 : len(prompt) - 1 + len(response)]
            assert torch.allclose(logprobs[row, : len(response)], expected, atol=1e-5)
    assert (entropy > 0).all()


def test_ppo_update_raises_the_probability_of_advantaged_tokens(tiny_base_model):
    lm, _ = load_mamba(tiny_base_model)
    policy = PolicyWithValueHead(lm)
    batch = build_response_batch([[1, 40, 41], [1, 50]], [[60, 61, 62], [70, 71, 2]], pad_id=0)
    with torch.no_grad():
        logprobs, values, _ = policy(batch.input_ids, batch.positions, batch.targets)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    zeros = torch.zeros(2)
    rollout = Rollout(batch, logprobs, logprobs, values, zeros, advantages, advantages, values, zeros,
                      torch.zeros(2, dtype=torch.bool), torch.full((2,), 3.0))
    cfg = PPOConfig(rollout_batch_size=2, mini_batch_size=2, ppo_epochs=3, learning_rate=1e-3)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.learning_rate)
    stats = ppo_update(policy, optimizer, rollout, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        after, _, _ = policy(batch.input_ids, batch.positions, batch.targets)
    assert (after[0] > logprobs[0]).all(), "positive advantage: more likely"
    assert (after[1] < logprobs[1]).all(), "negative advantage: less likely"
    assert {"pg_loss", "vf_loss", "approx_kl", "pg_clipfrac", "entropy"} <= set(stats)


def test_prompt_order_uses_every_prompt_once_per_epoch():
    seen = [i for step in range(5) for i in _prompt_order(10, seed=3, step=step, batch_size=2)]
    assert sorted(seen) == list(range(10))
    assert _prompt_order(10, 3, 7, 2) == _prompt_order(10, 3, 7, 2)  # a function of (seed, step)


def test_rollouts_of_an_adapter_policy_use_its_disabled_adapter_as_the_frozen_reference(tiny_base_model):
    from src.rlhf.ppo import collect_rollout
    from src.rlhf.reward_model import RewardModel
    from src.training.adapters import AdapterConfig, apply_adapter

    lm, tok = load_mamba(tiny_base_model)
    frozen, _ = load_mamba(tiny_base_model)
    apply_adapter(lm, AdapterConfig(r=4, target_modules=["in_proj"]))
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    policy = PolicyWithValueHead(lm)
    torch.manual_seed(0)
    reward_model = RewardModel(load_mamba(tiny_base_model)[0]).eval()
    prompts = [[tok.bos_id] + tok.encode(p) for p in ("def load", "class Cache", "import os")]
    cfg = PPOConfig(rollout_batch_size=3, mini_batch_size=3, max_new_tokens=6)
    shared = collect_rollout(policy, None, reward_model, tok, prompts, cfg, 0.1, seed=3)
    copied = collect_rollout(policy, frozen, reward_model, tok, prompts, cfg, 0.1, seed=3)
    assert torch.equal(shared.kl, copied.kl) and torch.equal(shared.rewards, copied.rewards)
    assert shared.kl.abs().sum() > 0  # the policy differs from its reference
    assert all(p.requires_grad == (".lora_" in n or n.startswith("value_head")) for n, p in policy.named_parameters())


@pytest.mark.skipif(not native.available()[0], reason="the native kernel cannot be built here")
def test_rollouts_decode_natively_from_the_updated_weights(tiny_base_model, sample_data_dir, monkeypatch):
    """PPO's rollouts use the default decoder: the native kernel, its weights packed again
    after each update (the weights' fingerprint changed), so iteration 2 samples from the
    updated policy exactly as the eager step does, with the same seed."""
    from src.data.readers import read_sft
    from src.rlhf.data import PromptFormat
    from src.rlhf.reward_model import RewardModel

    _, tok = load_mamba(tiny_base_model)
    fmt = PromptFormat(tok, max_prompt_tokens=24, max_response_tokens=16)
    prompts = [fmt.prompt_ids(e.prompt) for e in read_sft(sample_data_dir / "sft_train.jsonl")[:8]]
    cfg = PPOConfig(rollout_batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=3e-3, max_new_tokens=10)

    def two_iterations() -> list[list[list[int]]]:
        torch.manual_seed(0)
        policy = PolicyWithValueHead(load_mamba(tiny_base_model)[0])
        reference = load_mamba(tiny_base_model)[0].eval()
        reward_model = RewardModel(load_mamba(tiny_base_model)[0]).eval()
        optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.learning_rate)
        targets = []
        for step in range(2):
            rollout = collect_rollout(policy, reference, reward_model, tok, prompts, cfg, 0.1, seed=11 + step)
            targets.append([row[: int(n)] for row, n in zip(rollout.batch.targets.tolist(), rollout.response_lengths.tolist())])
            ppo_update(policy, optimizer, rollout, cfg, torch.Generator().manual_seed(step))
        assert generate_module.default_decoder(policy.lm).backend == ("eager" if forced_eager else "native")
        return targets

    forced_eager = False
    native_samples = two_iterations()
    monkeypatch.setattr(generate_module, "default_decoder", lambda model: Decoder(model, "eager"))
    forced_eager = True
    assert native_samples == two_iterations()
