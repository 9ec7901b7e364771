"""Real component training tasks on deliberately unequal micro-batches, for the engine's
token-exact loss tests (tests/training/test_exact_loss.py), in-process or under
``accelerate launch`` (DDP over gloo on CPU):

    python tests/training/exact_loss_script.py {mamba|mamba_lora|sft} DATA_DIR OUT_DIR BATCH ACCUM [--mean] [--pretrained DIR]

* ``mamba``: the Mamba LM task of :func:`src.mamba.train.build_task` (tiny model), its training
  stream cut to 16 windows whose last window is padded (only a quarter of it is labels);
* ``mamba_lora``: the same task on a pretrained transformers folder (``--pretrained``, written by
  the test) with a LoRA adapter on ``in_proj`` (``model.adapter``): only the adapter trains, and
  its checkpoint holds only the adapter;
* ``sft``: SFT's loss and item count (:mod:`src.rlhf.sft`) on 16 sample pairs whose responses
  have different lengths, on a tiny Mamba LM.

``--mean`` puts back the old normalisation (mean of micro-batch means), to show the tests
can see the difference. One epoch; the engine writes ``OUT_DIR/ckpt/checkpoint_epoch_1.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from src.core.config import PathsConfig, StrictModel, SystemConfig, TrainingConfig, load_config  # noqa: E402
from src.training.engine import TrainTask, fit  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WINDOWS = 16  # two global batches of 8
WINDOW = 32


class _Config(StrictModel):
    training: TrainingConfig
    paths: PathsConfig
    system: SystemConfig


def _training(batch: int, accum: int) -> dict:
    return {"batch_size": batch, "gradient_accumulation_steps": accum, "num_epochs": 1, "learning_rate": 0.001,
            "lr_scheduler": "constant", "warmup_steps": 0, "log_steps": 1, "max_grad_norm": 1.0, "mixed_precision": False}


def mamba_task(data_dir: Path, out: Path, batch: int, accum: int, pretrained: Path | None = None) -> tuple[TrainTask, object]:
    from src.mamba.config import MambaTrainConfig
    from src.mamba.data import TokenWindows
    from src.mamba.train import build_task

    overrides = [
        f"data.train_file={data_dir / 'lm_train.jsonl'}", f"data.val_file={data_dir / 'lm_val.jsonl'}",
        f"paths.checkpoint_dir={out / 'ckpt'}", f"paths.log_dir={out / 'logs'}", "system.device=cpu", "system.seed=3",
        "model.vocab_size=300", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.state_size=8",
        f"model.max_length={WINDOW}", "model.chunk_size=16",
        *(f"training.{k}={v}" for k, v in _training(batch, accum).items()),
        *([f"model.pretrained={pretrained}", "model.adapter={r: 4, alpha: 8, target_modules: [in_proj]}",
           "training.learning_rate=0.01"] if pretrained else []),
    ]
    cfg = load_config(REPO / "configs" / "mamba_train.yaml", MambaTrainConfig, overrides)
    task, _ = build_task(cfg)
    full = task.train_dataset
    # 15 full windows and a 16th holding WINDOW // 4 labels, the rest padding
    stream = full.stream[: (WINDOWS - 1) * WINDOW + WINDOW // 4 + 1]
    task.train_dataset = TokenWindows(stream, WINDOW, full.pad_id)
    assert len(task.train_dataset) == WINDOWS
    task.val_dataset = None
    return task, cfg


def sft_task(data_dir: Path, out: Path, batch: int, accum: int) -> tuple[TrainTask, object]:
    from src.core.runtime import seed_everything
    from src.data.readers import read_documents, read_sft
    from src.mamba.model import MambaArgs, MambaLM
    from src.mamba.tokenizer import MambaTokenizer
    from src.rlhf.data import PromptFormat, SFTDataset, collate_sft
    from src.rlhf.sft import count_response_tokens, response_loss_sum

    tokenizer = MambaTokenizer.train((d.text for d in read_documents(data_dir / "lm_train.jsonl")), 300, 2)
    train_set = SFTDataset(read_sft(data_dir / "sft_train.jsonl")[:WINDOWS], PromptFormat(tokenizer, "{prompt}\n", 24, 96))
    responses = sorted({len(r) for _, r in train_set.items})
    assert len(responses) > 3, responses  # responses of many different lengths
    seed_everything(3)
    model = MambaLM(MambaArgs(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, state_size=8, chunk_size=16))
    cfg = _Config(training=TrainingConfig(**_training(batch, accum)), paths=PathsConfig(checkpoint_dir=out / "ckpt", log_dir=out / "logs"),
                  system=SystemConfig(device="cpu", seed=3))
    task = TrainTask(
        name="sft", model=model, train_dataset=train_set, collate_fn=lambda items: collate_sft(items, tokenizer.pad_id),
        loss_fn=response_loss_sum, count_items=count_response_tokens, example_lengths=train_set.lengths(),
    )
    return task, cfg


def as_mean_of_means(task: TrainTask) -> TrainTask:
    """The engine's former normalisation: each micro-batch's mean loss, averaged."""
    summed, count = task.loss_fn, task.count_items
    task.loss_fn = lambda m, b: summed(m, b) / max(1, count(b))
    task.count_items = None
    return task


def train(name: str, data_dir: Path, out: Path, batch: int, accum: int, mean: bool = False,
          pretrained: Path | None = None) -> dict[str, torch.Tensor]:
    """Train one epoch; the final weights (the engine's ``checkpoint_epoch_1.pt``)."""
    if name == "sft":
        task, cfg = sft_task(data_dir, out, batch, accum)
    else:
        if (name == "mamba_lora") != (pretrained is not None):
            raise SystemExit("mamba_lora needs --pretrained DIR (and only it)")
        task, cfg = mamba_task(data_dir, out, batch, accum, pretrained)
    if mean:
        as_mean_of_means(task)
    fit(task, cfg)
    from src.core.checkpoint import load_checkpoint

    return load_checkpoint(out / "ckpt" / "checkpoint_epoch_1.pt")["model"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    folder = Path(args[args.index("--pretrained") + 1]) if "--pretrained" in args else None
    train(args[0], Path(args[1]), Path(args[2]), int(args[3]), int(args[4]), "--mean" in args, folder)
