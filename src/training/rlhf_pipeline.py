"""The RLHF pipeline on MARK's Mamba LM: SFT -> reward model -> PPO and/or DPO -> evaluation -> export.

    python -m src.training.rlhf_pipeline --base-model mamba|FOLDER --config configs/rl_train.yaml \\
        --output-dir checkpoints/rlhf [--skip-sft] [--skip-reward] [--num-rl-steps N] [--method ppo|dpo|both] \\
        [--device cpu] [--resume] [key.sub=value ...]

Settings: the ``rlhf:`` section of ``--config`` when it has one; a file that is itself an
RLHF config (``configs/rlhf.yaml``) is used as it is; any other file (``rl_train.yaml``
without the section) falls back to ``rlhf.yaml`` beside it, else ``configs/rlhf.yaml``.
Overrides address the RLHF config (``training.ppo.num_steps=20``). Outputs (``sft_model.pt``,
``reward_model.pt``, ``ppo_policy.pt``, ``evaluation.*``, ``rlhf_final_model.pt``) go to
``--output-dir``; the recipe is :mod:`src.rlhf.train`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from src.core.cli import add_common_args, overrides_with_device, run_cli
from src.rlhf.config import load_rlhf_config
from src.rlhf.train import run

DEFAULT_CONFIG = "configs/rl_train.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.training.rlhf_pipeline",
        description="RLHF on the Mamba LM: SFT -> reward model -> PPO and/or DPO -> evaluation -> export.",
    )
    parser.add_argument("--base-model", default="mamba", metavar="mamba|FOLDER",
                        help="mamba (model.base_checkpoint) or a pretrained Mamba-2 folder (transformers or mamba_ssm layout)")
    parser.add_argument("--output-dir", help="where every stage's output goes (overrides paths.checkpoint_dir)")
    parser.add_argument("--skip-sft", action="store_true", help="use <output-dir>/sft_model.pt from an earlier run")
    parser.add_argument("--skip-reward", action="store_true", help="use <output-dir>/reward_model.pt from an earlier run")
    parser.add_argument("--num-rl-steps", type=int, help="PPO iterations (overrides training.ppo.num_steps)")
    parser.add_argument("--method", choices=["ppo", "dpo", "both"], help="alignment stage(s) after SFT (overrides training.method)")
    add_common_args(parser, DEFAULT_CONFIG, evaluate=True)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, load the config and run the pipeline; returns its summary."""
    args = build_parser().parse_args(argv)
    overrides = overrides_with_device(args)
    if args.output_dir:
        overrides.append(f"paths.checkpoint_dir={args.output_dir}")
    if args.num_rl_steps is not None:
        overrides.append(f"training.ppo.num_steps={args.num_rl_steps}")
    overrides += [f"training.method={args.method}"] if args.method else []
    overrides += [f"model.base_checkpoint={args.base_model}"] if args.base_model != "mamba" else []
    cfg = load_rlhf_config(args.config, overrides)
    return run(cfg, resume=args.resume, evaluate=args.evaluate, skip_sft=args.skip_sft, skip_reward=args.skip_reward)


__all__ = ["build_parser", "load_rlhf_config", "main", "run"]

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
