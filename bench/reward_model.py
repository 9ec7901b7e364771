"""Cheaper RLHF reward models at the same accuracy: which settings keep val accuracy >= 0.95?

    python bench/reward_model.py [--variants base L3 ...] [--config configs/demo/rlhf.yaml]
        [--threads 1] [--output bench/results/reward_model.json]

Each variant trains the encoder reward model (:func:`src.rlhf.reward_encoder.train_encoder_reward_model`,
the demo's settings from ``--config`` with the variant's changes) on ``data/preferences_train.jsonl``
and reports, on the **val** split (``data/preferences_val.jsonl``; the test split is not read):
pairwise accuracy and loss of the checkpoint the engine selects, the training wall and CPU
time, and the time to score the val pairs (what PPO, DPO's pair sampling and the evaluation pay
per answer). ``base`` is the demo's previous reward model (all 6 MiniLM layers trained, 128
word-pieces, 2 epochs): every ratio is against it, measured in the same run. Prints a table and
writes the JSON (one record per variant, written after each so a long run keeps what it did).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.core.config import PathsConfig  # noqa: E402
from src.data.readers import read_preferences  # noqa: E402
from src.core.runtime import machine_summary  # noqa: E402
from src.rlhf.config import StageConfig, load_rlhf_config  # noqa: E402
from src.rlhf.reward_encoder import train_encoder_reward_model  # noqa: E402

# name -> changes to training.reward of the config
VARIANTS: dict[str, dict] = {
    "base": {"encoder_layers": None, "frozen_layers": 0, "max_length": 128, "num_epochs": 2},
    "L3": {"encoder_layers": 3, "frozen_layers": 0, "max_length": 128, "num_epochs": 2},
    "L2": {"encoder_layers": 2, "frozen_layers": 0, "max_length": 128, "num_epochs": 2},
    "L3_len96": {"encoder_layers": 3, "frozen_layers": 0, "max_length": 96, "num_epochs": 2},
    "L3_1epoch": {"encoder_layers": 3, "frozen_layers": 0, "max_length": 128, "num_epochs": 1},
    "L3_len96_1epoch": {"encoder_layers": 3, "frozen_layers": 0, "max_length": 96, "num_epochs": 1},
    "L3_len64": {"encoder_layers": 3, "frozen_layers": 0, "max_length": 64, "num_epochs": 2},
    "L3_len64_bf16": {"encoder_layers": 3, "frozen_layers": 0, "max_length": 64, "num_epochs": 2, "mixed_precision": "bf16"},
    "L6_frozen4": {"encoder_layers": None, "frozen_layers": 4, "max_length": 128, "num_epochs": 2},
    "L3_frozen2": {"encoder_layers": 3, "frozen_layers": 2, "max_length": 128, "num_epochs": 2},
    "L2_1epoch": {"encoder_layers": 2, "frozen_layers": 0, "max_length": 128, "num_epochs": 1},
    # the scalar head on the SFT Mamba (--sft-model): no encoder at all
    "mamba_sft": {"backbone": "mamba", "encoder_layers": None, "frozen_layers": 0, "max_length": 128, "num_epochs": 2,
                  "learning_rate": 0.001},
    "mamba_sft_lr3e-4": {"backbone": "mamba", "encoder_layers": None, "frozen_layers": 0, "max_length": 128, "num_epochs": 2,
                         "learning_rate": 0.0003},
}


def run_variant(name: str, changes: dict, config: Path, workdir: Path, sft_model: Path | None = None) -> dict:
    cfg = load_rlhf_config(config)
    reward_cfg = cfg.training.reward.model_copy(update=changes)
    reward_cfg = type(reward_cfg).model_validate(reward_cfg.model_dump())
    train, val = read_preferences(cfg.data.preferences_train_file), read_preferences(cfg.data.preferences_val_file)
    out = workdir / name
    stage = StageConfig(stage="reward", training=reward_cfg, model=cfg.model, system=cfg.system,
                        output_file=out / "reward_model.pt", inputs={"variant": name},
                        paths=PathsConfig(checkpoint_dir=out / "reward", log_dir=out / "logs"))
    wall, cpu = time.perf_counter(), time.process_time()
    if reward_cfg.backbone == "mamba":
        if sft_model is None:
            raise SystemExit(f"{name}: the Mamba reward model needs --sft-model (an SFT model of the demo's base)")
        from src.mamba.load import load_mamba
        from src.rlhf.reward_model import train_reward_model

        result = train_reward_model(*load_mamba(sft_model), train, val, stage)
    else:
        result = train_encoder_reward_model(train, val, stage)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    from src.rlhf.data import PromptFormat
    from src.rlhf.evaluate import reward_model_pair_metrics
    from src.rlhf.load import load_reward_model

    model, tokenizer = load_reward_model(stage.output_file)
    fmt = PromptFormat(tokenizer, cfg.model.prompt_template, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    wall, cpu = time.perf_counter(), time.process_time()
    scored = reward_model_pair_metrics(model, val, fmt, 64)
    score_wall, score_cpu = time.perf_counter() - wall, time.process_time() - cpu
    metrics = result["metrics"]
    return {
        "variant": name, "backbone": reward_cfg.backbone, **changes, "val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"],
        "val_accuracy_reloaded": scored["val_accuracy"], "best_step": metrics["best_step"],
        "train_seconds": round(train_wall, 1), "train_cpu_seconds": round(train_cpu, 1),
        "score_val_pairs_seconds": round(score_wall, 2), "score_val_pairs_cpu_seconds": round(score_cpu, 2),
        "val_pairs": len(val),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--config", type=Path, default=Path("configs/demo/rlhf.yaml"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sft-model", type=Path, default=None, help="the SFT model under the Mamba reward model (mamba_* variants)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/reward_model.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = []
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    kept = {r["variant"]: r for r in previous.get("records", []) if r["variant"] not in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            print(f"== {name}: {VARIANTS[name]}", flush=True)
            records.append(run_variant(name, VARIANTS[name], args.config, Path(tmp), args.sft_model))
            print(json.dumps(records[-1]), flush=True)
            all_records = [*kept.values(), *records]
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps({"threads": args.threads, "machine": machine_summary(),
                                               "records": all_records}, indent=1) + "\n")
    all_records = [*kept.values(), *records]
    base = next((r for r in all_records if r["variant"] == "base"), None)
    print(f"\n{'variant':<12} {'layers':>6} {'frozen':>6} {'len':>4} {'ep':>3} {'val acc':>8} {'val loss':>9} "
          f"{'train s':>8} {'train cpu':>9} {'score s':>8}" + ("  cpu vs base" if base else ""))
    for r in all_records:
        ratio = f"  {r['train_cpu_seconds'] / base['train_cpu_seconds']:.2f}x" if base else ""
        print(f"{r['variant']:<12} {('mamba' if r.get('backbone') == 'mamba' else str(r['encoder_layers'] or 6)):>6} {r['frozen_layers']:>6} {r['max_length']:>4} {r['num_epochs']:>3} "
              f"{r['val_accuracy']:>8.3f} {r['val_loss']:>9.4f} {r['train_seconds']:>8.1f} {r['train_cpu_seconds']:>9.1f} "
              f"{r['score_val_pairs_seconds']:>8.2f}{ratio}")


if __name__ == "__main__":
    main()
