"""RLHF on MARK's Mamba LM, one module per stage, each a trainer function with its typed config:

    sft.py           train_sft            SFTConfig       loss on response tokens only (shared engine)
    reward_model.py  train_reward_model   RewardConfig    scalar head, Bradley-Terry loss (shared engine)
    ppo.py           train_ppo            PPOConfig       PPO with value head, KL penalty to the SFT model, GAE
    evaluation.py    evaluate_rlhf        EvaluationConfig  held-out reward, win rate, KL, perplexity
    export.py        export_rlhf_model / load_rlhf_model

``config.py`` holds the configs, ``data.py`` turns prompts and responses into token ids the
same way for every stage, ``checkpoints.py`` writes and reads what the stages hand on. The
pipeline that runs them in order is ``src/training/rlhf_pipeline.py``.

    from src.rlhf import load_rlhf_model
    model, tokenizer = load_rlhf_model("checkpoints/rlhf")   # a MambaLM: generate() works on it
"""

from src.rlhf.export import load_rlhf_model

__all__ = ["load_rlhf_model"]
