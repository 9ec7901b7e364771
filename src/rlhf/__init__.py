"""RLHF on MARK's Mamba LM, one module per stage, each a trainer function with its typed config:

    sft.py           train_sft            SFTConfig       loss on response tokens only (shared engine)
    reward_model.py  train_reward_model   RewardConfig    scalar head, Bradley-Terry loss (shared engine)
    ppo.py           train_ppo            PPOConfig       PPO with value head, KL penalty to the SFT model, GAE
    evaluate.py      evaluate_rlhf        EvaluationConfig  held-out reward, win rate, KL, perplexity
    export.py        export_rlhf_model    the final model file, with provenance

``config.py`` holds the configs (and ``load_rlhf_config``), ``data.py`` turns prompts and
responses into token ids the same way for every stage, ``checkpoints.py`` writes and reads
what the stages hand on, ``train.py`` is the recipe that runs the stages in order, and
``load.py`` reads the exported model. The spec's entry point, a shell over ``train.py``, is
``python -m src.training.rlhf_pipeline``.

    from src.rlhf import load_rlhf_model
    model, tokenizer = load_rlhf_model("checkpoints/rlhf")   # a MambaLM: generate() works on it
"""

from src.rlhf.load import load_rlhf_model

__all__ = ["load_rlhf_model"]
