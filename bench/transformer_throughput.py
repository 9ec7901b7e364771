"""Training throughput of MARK's engine vs. transformers' ``Trainer`` on the classifier.

    python bench/transformer_throughput.py [--examples 192] [--max-length 64] [--batch-size 16]
        [--repeats 2] [--threads N] [--base-model minilm-local] [--data-dir data]
        [--output bench/results/transformer_throughput.json]

Both loops fine-tune the same ``AutoModelForSequenceClassification`` (same pretrained
weights, same seed) on the same documents of the built-in classification set, windowed
and padded by the same collate function, one epoch at the same batch size, learning rate,
schedule, weight decay and clipping, fp32 on CPU (the device is picked as the classifier
picks it). The Trainer is handed MARK's sampling order (length-grouped batches, a
function of seed and epoch), so both loops see the very same batches in the same order:
the padded word-pieces, counted in the collate function, are equal.

The clock runs from the first batch's forward pass to the end of the last optimizer step
(MARK: the first ``loss_fn`` call to the last step's log record; Trainer: the first
``on_step_begin`` to the last ``on_step_end``), so model loading, checkpoint writing and
the final save are outside it. Runs alternate (MARK then Trainer, Trainer then MARK, ...),
each after one untimed warm-up step, and the best run of each is compared (the least
disturbed by other processes). Wall-clock examples/s and CPU time per example are both
reported: the second is less sensitive to other processes on a shared machine. Prints a
table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from src.core.config import validate_config  # noqa: E402
from src.core.runtime import resolve_device, seed_everything  # noqa: E402
from src.classifier.config import TransferConfig  # noqa: E402
from src.classifier.data import collate_windows  # noqa: E402
from src.scripts.train_transfer import build_task  # noqa: E402
from src.training import engine  # noqa: E402
from src.training.engine import fit  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=192, help="training documents (first N of the train split)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each loop (alternating)")
    parser.add_argument("--base-model", default="minilm-local")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data-dir", default="data", help="folder with classification_train.jsonl (made if missing)")
    parser.add_argument("--output", default="bench/results/transformer_throughput.json")
    return parser.parse_args(argv)


def make_config(args, data_dir: Path, work: Path) -> TransferConfig:
    return validate_config(
        {
            "model": {"base_model": args.base_model, "num_labels": 3, "max_length": args.max_length},
            "training": {
                "batch_size": args.batch_size, "num_epochs": 1, "learning_rate": 5e-5, "weight_decay": 0.01,
                "lr_scheduler": "linear", "warmup_ratio": 0.1, "max_grad_norm": 1.0, "mixed_precision": False,
                "log_steps": 10_000,
            },
            "data": {
                "train_file": str(data_dir / "classification_train.jsonl"), "val_file": None, "test_file": None,
                "max_train_examples": args.examples,
            },
            "paths": {"checkpoint_dir": str(work / "checkpoints"), "log_dir": str(work / "logs")},
            "system": {"device": args.device, "seed": 42},
        },
        TransferConfig,
        "bench",
    )


class Clock:
    """Wall-clock and CPU time (all threads of this process) from the first ``start`` to the last ``stop``."""

    def __init__(self):
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] | None = None

    def start(self) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        self.last = (time.perf_counter(), time.process_time())

    def elapsed(self) -> dict[str, float]:
        return {"seconds": self.last[0] - self.first[0], "cpu_seconds": self.last[1] - self.first[1]}


class PaddedTokenCounter:
    """Wraps a collate function and counts the word-piece positions (padding included) it emits."""

    def __init__(self, collate):
        self.collate = collate
        self.padded_tokens = 0
        self.examples = 0

    def __call__(self, items):
        batch = self.collate(items)
        self.padded_tokens += batch["input_ids"].numel()
        self.examples += len(items)
        return batch


def warm_up(task) -> None:
    """One forward/backward pass outside the clock (allocator, kernels, thread pools)."""
    batch = task.collate_fn([task.train_dataset[i] for i in range(min(4, len(task.train_dataset)))])
    task.model.to(resolve_device("auto")).train()
    batch = {k: v.to(next(task.model.parameters()).device) for k, v in batch.items()}
    task.loss_fn(task.model, batch).backward()
    task.model.zero_grad(set_to_none=True)


def run_mark(cfg: TransferConfig) -> dict:
    """One epoch through ``src.training.engine.fit``."""
    import shutil

    shutil.rmtree(cfg.paths.checkpoint_dir, ignore_errors=True)
    shutil.rmtree(cfg.paths.log_dir, ignore_errors=True)
    task, _ = build_task(cfg)
    warm_up(task)
    counter = PaddedTokenCounter(task.collate_fn)
    task.collate_fn = counter
    clock = Clock()
    loss_fn = task.loss_fn

    def timed_loss(model, batch):
        clock.start()
        return loss_fn(model, batch)

    class TimedMetricsLogger(engine.MetricsLogger):
        def log_metrics(self, metrics, step, kind="train"):
            if kind == "train":  # log_steps is larger than the run: only the last step logs
                clock.stop()
            super().log_metrics(metrics, step, kind)

    task.loss_fn = timed_loss
    original_logger, engine.MetricsLogger = engine.MetricsLogger, TimedMetricsLogger
    try:
        result = fit(task, cfg)
    finally:
        engine.MetricsLogger = original_logger
    records = [json.loads(line) for line in open(Path(cfg.paths.log_dir) / "metrics.jsonl")]
    return {
        "loop": "MARK engine",
        **clock.elapsed(),
        "steps": result.global_step,
        "examples": counter.examples,
        "padded_tokens": counter.padded_tokens,
        "mean_loss": [r for r in records if r["kind"] == "train"][-1]["loss"],
    }


def run_trainer(cfg: TransferConfig, work: Path) -> dict:
    """One epoch through ``transformers.Trainer`` on the same model, documents and collate function."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from src.training.engine import ResumableBatchSampler

    task, _ = build_task(cfg)  # same seed -> the same initial weights
    warm_up(task)
    tokenizer_pad = task.collate_fn.keywords["pad_token_id"]

    class OneWindowDataset(torch.utils.data.Dataset):
        """One window per document, as the Trainer's models take it."""

        def __init__(self, windowed):
            self.windowed = windowed

        def __len__(self):
            return len(self.windowed)

        def __getitem__(self, i):
            item = self.windowed[i]
            return {"input_ids": item["windows"][0], "label": item["label"]}

    def hf_collate(items):
        batch = collate_windows([{"windows": [x["input_ids"]], "label": x["label"]} for x in items], tokenizer_pad)
        batch.pop("doc_index")  # one window per document: the model's own loss is the same loss
        return batch

    class MarkOrder(torch.utils.data.Sampler):
        """The example order of MARK's sampler for epoch 0: cut into batches, MARK's very batches."""

        def __init__(self):
            self.sampler = ResumableBatchSampler(
                len(task.train_dataset), cfg.training.batch_size, cfg.system.seed, 0, True, lengths=task.example_lengths
            )

        def __len__(self):
            return len(task.train_dataset)

        def __iter__(self):
            return iter(self.sampler._order())

    class SameBatchesTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return MarkOrder()

    counter = PaddedTokenCounter(hf_collate)
    clock = Clock()

    class ClockCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.stop()

    tcfg = cfg.training
    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=tcfg.batch_size,
        num_train_epochs=tcfg.num_epochs,
        learning_rate=tcfg.learning_rate,
        weight_decay=tcfg.weight_decay,
        lr_scheduler_type=tcfg.lr_scheduler,
        warmup_steps=tcfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        max_grad_norm=tcfg.max_grad_norm,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=resolve_device(cfg.system.device).type == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=cfg.system.seed,
    )
    trainer = SameBatchesTrainer(
        model=task.model, args=args, train_dataset=OneWindowDataset(task.train_dataset),
        data_collator=counter, callbacks=[ClockCallback()],
    )
    output = trainer.train()
    return {
        "loop": "transformers Trainer",
        **clock.elapsed(),
        "steps": output.global_step,
        "examples": counter.examples,
        "padded_tokens": counter.padded_tokens,
        "mean_loss": output.training_loss,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from src.core.logging import setup_logging
    from src.data.prepare import prepare_sample_data

    setup_logging("bench")
    import logging

    logging.getLogger("mark").setLevel(logging.WARNING)  # the engine's per-run logs would bury the table
    data_dir = Path(args.data_dir)
    if not (data_dir / "classification_train.jsonl").is_file():
        data_dir = Path(tempfile.mkdtemp(prefix="mark-bench-data-"))
        prepare_sample_data(data_dir)
    runs = []
    with tempfile.TemporaryDirectory(prefix="mark-bench-") as tmp:
        cfg = make_config(args, data_dir, Path(tmp))
        loops = [lambda: run_mark(cfg), lambda: run_trainer(cfg, Path(tmp))]
        for repeat in range(args.repeats):
            # Alternate which loop goes first, so neither always gets the fresher machine.
            for runner in loops if repeat % 2 == 0 else loops[::-1]:
                seed_everything(cfg.system.seed)
                run = runner()
                run["repeat"] = repeat + 1
                run["examples_per_s"] = run["examples"] / run["seconds"]
                run["padded_tokens_per_s"] = run["padded_tokens"] / run["seconds"]
                run["cpu_ms_per_example"] = 1000 * run["cpu_seconds"] / run["examples"]
                runs.append(run)
                print(f"  {run['loop']:<22} run {repeat + 1}: {run['examples_per_s']:.2f} examples/s", flush=True)

    best = {loop: max((r for r in runs if r["loop"] == loop), key=lambda r: r["examples_per_s"]) for loop in ("MARK engine", "transformers Trainer")}
    mark, hf = best["MARK engine"], best["transformers Trainer"]  # best wall-clock run of each
    ratio = mark["examples_per_s"] / hf["examples_per_s"]
    device = resolve_device(args.device)
    print()
    print(f"{'loop':<22} {'examples/s':>11} {'padded tok/s':>13} {'CPU ms/example':>15} {'steps':>6} {'examples':>9} {'padded tok':>11} {'mean loss':>10}")
    for run in (mark, hf):
        print(
            f"{run['loop']:<22} {run['examples_per_s']:11.2f} {run['padded_tokens_per_s']:13.0f} {run['cpu_ms_per_example']:15.1f} "
            f"{run['steps']:6d} {run['examples']:9d} {run['padded_tokens']:11d} {run['mean_loss']:10.4f}"
        )
    if mark["padded_tokens"] != hf["padded_tokens"]:
        print("warning: the two loops padded to different lengths; the comparison is not like for like")
    cpu_ratio = hf["cpu_ms_per_example"] / mark["cpu_ms_per_example"]
    print(f"\nratio MARK / Trainer (examples/s): {ratio:.3f}  (goal >= 1.0)")
    print(f"ratio Trainer / MARK (CPU time per example): {cpu_ratio:.3f}  (less sensitive to other processes)")
    report = {
        "benchmark": "transformer_throughput",
        "setup": {
            "base_model": args.base_model, "examples": args.examples, "max_length": args.max_length,
            "batch_size": args.batch_size, "epochs": 1, "precision": "fp32", "repeats": args.repeats,
            "device": str(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "best": {"mark": mark, "trainer": hf},
        "ratio_examples_per_s": ratio,
        "ratio_cpu_time_per_example": cpu_ratio,
        "load_average_at_end": list(os.getloadavg()),
        "runs": runs,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
