"""The stage table's key-metric cell (src/pipelines/stages.py)."""

from src.pipelines.stages import TRAIN_STAGES, format_key_metric


def test_rlhf_key_metric_quotes_the_exported_policy():
    """The RLHF row quotes the win rate and reward of the policy that was exported (DPO in
    the demo), PPO's when the export does not say."""
    stage = TRAIN_STAGES["train_rlhf"]
    evaluation = {"ppo_win_rate_vs_sft": 0.6667, "reward_ppo_mean": -1.405, "dpo_win_rate_vs_sft": 0.7077,
                  "reward_dpo_mean": -1.423, "reward_sft_mean": -1.628}
    dpo = format_key_metric(stage, {"evaluation": evaluation, "export": {"policy": "dpo"}})
    assert dpo == "DPO test win rate vs SFT 0.7077, reward DPO -1.423"
    assert format_key_metric(stage, {"evaluation": evaluation}) == "PPO test win rate vs SFT 0.6667, reward PPO -1.405"
    # Exporting SFT: no win rate of SFT against itself; its reward and the next metric instead.
    assert format_key_metric(stage, {"evaluation": evaluation, "export": {"policy": "sft"}}).startswith("reward SFT -1.628")
