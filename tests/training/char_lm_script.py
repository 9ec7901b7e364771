"""A small real training job for the engine's tests: a character-level GRU language model
on the docstrings of a few standard-library modules (real text, read offline).

    python tests/training/char_lm_script.py --config CFG.yaml [--resume] [key.sub=value ...]

Prints nothing special; writes checkpoints through the engine like every component.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from src.core.cli import add_common_args, overrides_with_device, run_cli  # noqa: E402
from src.core.config import PathsConfig, StrictModel, SystemConfig, TrainingConfig, load_config  # noqa: E402
from src.core.runtime import seed_everything  # noqa: E402
from src.training.adapters import AdapterConfig, apply_adapter  # noqa: E402
from src.training.engine import TrainTask, fit  # noqa: E402


class CharModelConfig(StrictModel):
    hidden: int = 32
    context: int = 32
    dropout: float = 0.1
    adapter: AdapterConfig | None = None  # LoRA on the (frozen) model's linear layers


class CharDataConfig(StrictModel):
    modules: list[str] = ["json", "textwrap", "string"]
    max_chars: int = 6000


class CharLMConfig(StrictModel):
    model: CharModelConfig = CharModelConfig()
    training: TrainingConfig
    data: CharDataConfig = CharDataConfig()
    paths: PathsConfig
    system: SystemConfig = SystemConfig()


def corpus(modules: list[str], max_chars: int) -> str:
    import importlib

    parts = []
    for name in modules:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n".join(p for p in parts if p)[:max_chars]


class CharLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.drop(self.embed(ids)))
        return self.head(self.drop(out))


def build_task(cfg: CharLMConfig) -> TrainTask:
    text = corpus(cfg.data.modules, cfg.data.max_chars)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    n = (len(ids) - 1) // cfg.model.context
    windows = [ids[i * cfg.model.context : (i + 1) * cfg.model.context + 1] for i in range(n)]
    split = int(len(windows) * 0.9)
    seed_everything(cfg.system.seed)
    model = CharLM(len(chars), cfg.model.hidden, cfg.model.dropout)
    if cfg.model.adapter is not None:
        apply_adapter(model, cfg.model.adapter)
    loss_f = nn.CrossEntropyLoss()

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        return loss_f(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))

    def eval_step(m, batch):
        logits = m(batch[:, :-1])
        losses = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(1)
        return {"loss": losses.tolist()}

    return TrainTask(
        name="charlm",
        model=model,
        train_dataset=windows[:split],
        val_dataset=windows[split:],
        collate_fn=torch.stack,
        loss_fn=loss_fn,
        eval_step=eval_step,
        compute_metrics=lambda out: {"val_loss": sum(out["loss"]) / len(out["loss"])},
        extra_state={"chars": "".join(chars)},
        count_tokens=lambda b: b.numel(),
    )


def main(argv=None):
    parser = argparse.ArgumentParser()
    add_common_args(parser, default_config="")
    parser.add_argument("--final-weights", default=None, help="save the model's weights after fit() here")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, CharLMConfig, overrides_with_device(args))
    torch.set_num_threads(1)
    task = build_task(cfg)
    result = fit(task, cfg, resume=args.resume)
    if args.final_weights:
        torch.save({"model": task.model.state_dict(), "metrics": result.metrics, "step": result.global_step,
                    "stopped_early": result.stopped_early}, args.final_weights)
    return {"metrics": result.metrics, "step": result.global_step}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
