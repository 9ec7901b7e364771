"""The one training loop: every gradient-trained component (Mamba, classifier, SFT, reward
model) hands a :class:`TrainTask` to :func:`fit`.

What lives here, once:
* Hugging Face Accelerate for devices, DDP / FSDP / DeepSpeed (through ``accelerate launch``
  and Accelerate's own config) and mixed precision;
* gradient accumulation, clipping, warmup + LR schedule, seeding, DataLoader workers;
* validation every ``eval_steps`` and at each epoch end, ``best_model.pt`` by the task's metric;
  early stopping after ``early_stopping_patience`` validations without improvement, the best
  weights restored into the model at the end;
* checkpoints (``checkpoint_epoch_N.pt``, ``checkpoint_step_N.pt``) holding model (for a model
  with a LoRA adapter, :mod:`src.training.adapters`, only the adapter: what trains), optimizer,
  scheduler, grad scaler, RNG states, epoch, step and the position in the data, written
  atomically; ``resume=True`` continues from the exact step of the latest one;
* progress bar, ``train.log`` and ``metrics.jsonl``;
* SIGTERM (the Board's Stop, ``kill``): the step in progress finishes, a resumable
  ``checkpoint_step_N.pt`` is written and :class:`TrainingStopped` (exit code 143) is raised.

Exact resume: the order of the training data is a function of (seed, epoch) only (see
:class:`ResumableBatchSampler`), the DataLoader draws no numbers from the global RNG, and
checkpoints are taken only at optimizer-step boundaries, so a resumed run replays exactly
the batches and random numbers the uninterrupted run would have used.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from src.core.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_latest_pointer,
)
from src.core.config import config_to_dict, save_config
from src.core.errors import CheckpointError, DataError, TrainingStopped
from src.core.logging import MetricsLogger, setup_logging
from src.core.runtime import (
    capture_rng_state,
    resolve_device,
    resolve_mixed_precision,
    restore_rng_state,
    tune_cpu_allocator,
)
from src.training.adapters import load_trainable_state, trainable_state_dict

Batch = Any


@dataclass
class TrainTask:
    """What a component gives the engine: its model, data and the parts that are its own.

    ``loss_fn(model, batch)`` returns the loss of the batch (a scalar tensor): with
    ``count_items`` its SUM over the batch's items, otherwise its mean.
    ``count_items(batch)`` (optional) is the number of items the loss is summed over (label
    tokens, preference pairs, documents). With it, every optimizer step's loss is the sum over
    all its micro-batches and processes divided by the global number of items, counted and
    all-reduced before the first backward pass (Hugging Face's ``num_items_in_batch``): so
    gradient accumulation and N processes give exactly the gradient of one big batch even
    when micro-batches hold different numbers of items (padded windows, responses of
    different lengths). Without it the engine averages the micro-batch means, which is exact
    only when every micro-batch has the same number of items.
    ``eval_step(model, batch)`` returns a dict of lists (e.g. per-example losses, predictions);
    the engine concatenates them over all batches and processes and hands them to
    ``compute_metrics``, which returns the validation metrics (``{"val_loss": ...}``).
    ``extra_state`` is saved into every checkpoint and ``best_model.pt`` (tokenizer, label
    names, model config...); ``check_resume(extra_state_of_checkpoint)`` may refuse a checkpoint.
    ``example_lengths`` (one per training example, e.g. its token count), when given, makes
    batches of examples of similar length, so padded batches waste less compute.
    """

    name: str
    model: nn.Module
    train_dataset: Dataset
    collate_fn: Callable[[list], Batch]
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
    val_dataset: Dataset | None = None
    eval_step: Callable[[nn.Module, Batch], dict[str, list]] | None = None
    compute_metrics: Callable[[dict[str, list]], dict[str, float]] | None = None
    metric_for_best: str = "val_loss"
    greater_is_better: bool = False
    extra_state: dict[str, Any] = field(default_factory=dict)
    check_resume: Callable[[dict[str, Any]], None] | None = None
    count_tokens: Callable[[Batch], int] | None = None
    count_items: Callable[[Batch], int] | None = None
    kind: str | None = None  # checkpoint "kind"; defaults to name
    example_lengths: list[int] | None = None


@dataclass
class TrainResult:
    """What :func:`fit` returns."""

    metrics: dict[str, float]
    best_metric: float | None
    best_model_path: Path | None
    last_checkpoint: Path | None
    global_step: int
    epochs_completed: int
    history: list[dict[str, Any]]
    stopped_early: bool = False


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices whose order depends only on (seed, epoch): restartable at any batch.

    A *global* batch of ``batch_size * world_size`` indices is cut from the epoch's
    permutation and split across processes, so N processes with batch B see exactly the
    data one process with batch N*B sees. ``start_batch`` skips already-consumed batches.
    With ``lengths``, the permutation is cut into groups of ``LENGTH_GROUP_BATCHES`` global
    batches, each group is sorted by length and cut into batches, and the batches are
    shuffled: similar lengths share a batch (less padding), still a function of (seed, epoch).
    """

    LENGTH_GROUP_BATCHES = 50

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        lengths: list[int] | None = None,
    ) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"{len(lengths)} lengths for {num_examples} examples")
        self.lengths = lengths

    def __len__(self) -> int:
        return max(0, self.num_global_batches() - self.start_batch)

    def num_global_batches(self) -> int:
        return math.ceil(self.num_examples / (self.batch_size * self.world_size))

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        if self.lengths is None:
            return order
        global_size = self.batch_size * self.world_size
        group = global_size * self.LENGTH_GROUP_BATCHES
        batches = []
        for start in range(0, len(order), group):
            chunk = sorted(order[start : start + group], key=lambda i: -self.lengths[i])
            batches += [chunk[b : b + global_size] for b in range(0, len(chunk), global_size)]
        # A short last batch stays last, so every other batch keeps its global size.
        tail = [batches.pop()] if len(batches[-1]) < global_size else []
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [i for b in shuffled for i in batches[b]] + [i for b in tail for i in b]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        global_size = self.batch_size * self.world_size
        for b in range(self.start_batch, self.num_global_batches()):
            chunk = order[b * global_size : (b + 1) * global_size]
            if len(chunk) < global_size and self.world_size > 1:
                chunk = chunk + order[: global_size - len(chunk)]  # pad like DistributedSampler
            local = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if local:
                yield local


def build_accelerator(device: str, mixed_precision: bool | str):
    """An ``accelerate.Accelerator`` for ``system.device`` and ``training.mixed_precision``.

    Under ``accelerate launch`` the process group (DDP, FSDP, DeepSpeed) comes from
    Accelerate's own config. In a single process a new Accelerator may be built for each
    component (the full pipeline trains several), so the shared state is reset first.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    torch_device = resolve_device(device)
    mp = resolve_mixed_precision(mixed_precision, torch_device)
    if torch_device.type == "cpu":
        tune_cpu_allocator()  # reuse the heap for large CPU tensors (see its docstring)
    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(cpu=torch_device.type == "cpu", mixed_precision=mp)


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay.

    Uses torch's fused AdamW kernel where the parameters allow it (CPU and CUDA): on CPU its
    step is several times faster than the default per-tensor loop, for the same update.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel lacks
        return torch.optim.AdamW(groups, lr=learning_rate)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then constant, linear decay to 0, or cosine decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _move(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


def _loader(dataset: Dataset, sampler: Sampler, collate_fn, num_workers: int, seed: int) -> DataLoader:
    # Own generator: without it, creating the iterator draws a seed from the global RNG,
    # which would shift the random stream of a run resumed mid-epoch.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def fit(task: TrainTask, cfg: Any, resume: bool = False) -> TrainResult:
    """Train ``task.model`` with the settings of ``cfg`` (its ``training``, ``system`` and ``paths``).

    Writes ``<checkpoint_dir>/checkpoint_epoch_N.pt``, ``checkpoint_step_N.pt`` (every
    ``save_steps``), ``best_model.pt``, ``config.yaml``; logs to ``<log_dir>/train.log`` and
    ``metrics.jsonl``. With ``resume=True`` continues from the latest checkpoint.

    Early stopping (``training.early_stopping_patience`` > 0): after that many validations in
    a row whose ``task.metric_for_best`` is not better than the best so far by more than
    ``early_stopping_min_delta``, training ends (a resumable checkpoint is written first); the
    counter and the best value are part of every checkpoint, so a resumed run stops where the
    uninterrupted one would. With it on, ``best_model.pt``'s weights are loaded back into
    ``task.model`` at the end and the returned ``metrics`` are that checkpoint's.
    """
    tcfg, scfg, paths = cfg.training, cfg.system, cfg.paths
    kind = task.kind or task.name
    ckpt_dir, log_dir = Path(paths.checkpoint_dir), Path(paths.log_dir)
    accelerator = build_accelerator(scfg.device, tcfg.mixed_precision)
    is_main = accelerator.is_main_process
    log = setup_logging(task.name, log_dir, is_main)
    rank, world = accelerator.process_index, accelerator.num_processes
    config_dict = config_to_dict(cfg)
    metrics_log = MetricsLogger(
        log_dir, task.name, enabled=is_main, use_tensorboard=scfg.use_tensorboard,
        use_wandb=scfg.use_wandb, wandb_project=scfg.wandb_project, config=config_dict,
    )

    accum = tcfg.gradient_accumulation_steps
    sampler_for = lambda epoch, start=0: ResumableBatchSampler(  # noqa: E731
        len(task.train_dataset), tcfg.batch_size, scfg.seed, epoch, True, rank, world, start, task.example_lengths
    )
    batches_per_epoch = sampler_for(0).num_global_batches()
    if batches_per_epoch == 0:
        raise DataError(f"{task.name}: the training set is empty")
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * tcfg.num_epochs
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)
    warmup = tcfg.warmup_steps or int(tcfg.warmup_ratio * total_steps)

    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_metric": None, "best_step": None,
             "evals_without_improvement": 0, "stopped_early": False}
    patience = tcfg.early_stopping_patience or 0
    last_checkpoint: Path | None = None
    ckpt = None
    if resume:
        last_checkpoint = find_latest_checkpoint(ckpt_dir)
        if last_checkpoint is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
        else:
            ckpt = load_checkpoint(last_checkpoint, kind=kind)
            if task.check_resume is not None:
                task.check_resume(ckpt.get("extra", {}))
            # Into the plain module, before accelerator.prepare wraps it: a full state dict
            # cannot be loaded into FSDP's sharded (flattened) parameters afterwards.
            # An adapted model's checkpoints hold only the adapter: the frozen base is already loaded.
            load_trainable_state(task.model, ckpt["model"], last_checkpoint)

    model = task.model
    optimizer = build_optimizer(model, tcfg.learning_rate, tcfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        lr_lambda(tcfg.lr_scheduler, warmup, total_steps),
    )
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if accelerator.scaler is not None and ckpt.get("scaler"):
            accelerator.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        restore_rng_state(rng[rank] if len(rng) == world else rng[0])
        state.update(ckpt["progress"])
        log.info("resumed from %s at epoch %d, step %d", last_checkpoint, state["epoch"] + 1, state["step"])
        del ckpt

    # Only now, after a checkpoint refused on resume could have stopped the run: nothing is overwritten before.
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, ckpt_dir / "config.yaml")

    def save_resumable(path: Path) -> Path:
        rng_states = _gather_objects(accelerator, capture_rng_state())
        if is_main:
            save_checkpoint(
                {
                    "kind": kind,
                    "model": trainable_state_dict(task.model, accelerator.get_state_dict(model)),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "rng": rng_states,
                    "progress": dict(state),
                    "config": config_dict,
                    "extra": task.extra_state,
                },
                path,
            )
            write_latest_pointer(ckpt_dir, path, state["step"])
            if path.name.startswith("checkpoint_step_"):
                _prune_step_checkpoints(ckpt_dir, tcfg.save_total_limit)
        accelerator.wait_for_everyone()
        return path

    history: list[dict[str, Any]] = []
    last_metrics: dict[str, float] = {}
    best_path = ckpt_dir / "best_model.pt"

    def evaluate() -> dict[str, float]:
        nonlocal last_metrics
        if task.val_dataset is None or task.eval_step is None or task.compute_metrics is None:
            return {}
        model.eval()
        eval_bs = tcfg.eval_batch_size or tcfg.batch_size
        n_val = len(task.val_dataset)
        # Contiguous shards: each process evaluates its own slice of the validation set.
        shard = list(range(rank, math.ceil(n_val / eval_bs), world))
        batches = [list(range(b * eval_bs, min(n_val, (b + 1) * eval_bs))) for b in shard]
        loader = _loader(task.val_dataset, batches, task.collate_fn, scfg.num_workers, scfg.seed)
        outputs: dict[str, list] = {}
        with torch.no_grad():
            for batch in loader:
                batch = _move(batch, accelerator.device)
                with accelerator.autocast():
                    out = task.eval_step(model, batch)
                for key, values in out.items():
                    outputs.setdefault(key, []).extend(values)
        model.train()
        if world > 1:
            gathered = _gather_objects(accelerator, outputs)
            outputs = {k: [v for part in gathered for v in part.get(k, [])] for k in gathered[0]}
        metrics = task.compute_metrics(outputs)
        last_metrics = metrics
        metrics_log.log_metrics(metrics, state["step"], kind="eval")
        history.append({"kind": "eval", "step": state["step"], **metrics})
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        log.info("eval at step %d: %s", state["step"], shown)
        value = metrics.get(task.metric_for_best)
        if value is not None:
            best = state["best_metric"]
            better = best is None or (value > best if task.greater_is_better else value < best)
            if patience:
                gain = None if best is None else (value - best if task.greater_is_better else best - value)
                improved = gain is None or gain > tcfg.early_stopping_min_delta
                state["evals_without_improvement"] = 0 if improved else state["evals_without_improvement"] + 1
                if state["evals_without_improvement"] >= patience:
                    state["stopped_early"] = True
                    log.info(
                        "early stopping at step %d: %s has not improved by more than %g for %d validations "
                        "(best %.4f at step %s)", state["step"], task.metric_for_best, tcfg.early_stopping_min_delta,
                        patience, best, state["best_step"],
                    )
            if better:
                state["best_metric"], state["best_step"] = float(value), state["step"]
                if is_main:
                    save_checkpoint(
                        {
                            "kind": kind,
                            "model": trainable_state_dict(task.model, accelerator.get_state_dict(model)),
                            "config": config_dict,
                            "extra": task.extra_state,
                            "metrics": metrics,
                            "step": state["step"],
                            "epoch": state["epoch"],
                        },
                        best_path,
                    )
                    log.info("new best %s %.4f: saved %s", task.metric_for_best, value, best_path)
                accelerator.wait_for_everyone()
        return metrics

    params = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "training %s: %d examples, %d batches/epoch of %d x %d process(es), %d optimizer steps, device %s, precision %s",
        task.name, len(task.train_dataset), batches_per_epoch, tcfg.batch_size, world, total_steps,
        accelerator.device, accelerator.mixed_precision,
    )
    stop = _StopOnSigterm()
    progress = tqdm(total=total_steps, initial=state["step"], desc=f"train {task.name}", disable=not is_main, dynamic_ncols=True)
    window_loss, window_count, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    done = state["step"] >= total_steps or state["stopped_early"]
    model.train()
    while state["epoch"] < tcfg.num_epochs and not done:
        epoch = state["epoch"]
        start = state["batch_in_epoch"]
        loader = _loader(task.train_dataset, sampler_for(epoch, start), task.collate_fn, scfg.num_workers, scfg.seed + epoch)
        group: list[Batch] = []
        for batch_idx, batch in enumerate(loader, start=start):
            group_start = (batch_idx // accum) * accum
            group_size = min(accum, batches_per_epoch - group_start)
            group.append(batch)
            if batch_idx + 1 != group_start + group_size:
                continue  # the whole optimizer step's micro-batches first: their item count scales the loss
            step_loss, step_weight, step_tokens = _accumulate_gradients(task, model, accelerator, group, world)
            group = []
            window_loss += step_loss
            window_count += step_weight
            window_tokens += step_tokens
            grad_norm = None
            if tcfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(params, tcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch_in_epoch"] = batch_idx + 1
            progress.update(1)
            if state["step"] % tcfg.log_steps == 0 or state["step"] == total_steps:
                elapsed = max(1e-9, time.perf_counter() - window_start)
                loss_value = _window_loss(accelerator, task, window_loss, window_count)
                record = {"epoch": epoch + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if window_tokens:
                    record["tokens_per_s"] = window_tokens * world / elapsed
                progress.set_postfix(
                    loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}",
                    **({"tok/s": f"{record['tokens_per_s']:.0f}"} if window_tokens else {}),
                )
                metrics_log.log_metrics(record, state["step"], kind="train")
                history.append({"kind": "train", "step": state["step"], **record})
                log.info(
                    "step %d/%d | epoch %d | loss %.4f | lr %.2e%s", state["step"], total_steps, epoch + 1,
                    loss_value, record["lr"],
                    f" | {record['tokens_per_s']:.0f} tok/s" if window_tokens else "",
                )
                window_loss, window_count, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            end_of_epoch = state["batch_in_epoch"] >= batches_per_epoch
            done = state["step"] >= total_steps
            if tcfg.eval_steps and state["step"] % tcfg.eval_steps == 0 and not end_of_epoch:
                evaluate()
                if state["stopped_early"]:
                    last_checkpoint = save_resumable(ckpt_dir / f"checkpoint_step_{state['step']}.pt")
                    done = True
                    break
            if tcfg.save_steps and state["step"] % tcfg.save_steps == 0 and not end_of_epoch:
                last_checkpoint = save_resumable(ckpt_dir / f"checkpoint_step_{state['step']}.pt")
            if done:
                break
            if stop.requested(accelerator):
                path = save_resumable(ckpt_dir / f"checkpoint_step_{state['step']}.pt")
                stop.restore()
                progress.close()
                metrics_log.close()
                log.info("stopped by SIGTERM at step %d: %s (continue with --resume)", state["step"], path)
                raise TrainingStopped(f"stopped by SIGTERM at step {state['step']}/{total_steps}; checkpoint {path} (continue with --resume)")
        if state["batch_in_epoch"] >= batches_per_epoch:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            evaluate()
            last_checkpoint = save_resumable(ckpt_dir / f"checkpoint_epoch_{state['epoch']}.pt")
            done = done or state["stopped_early"]
        elif done and not state["stopped_early"]:  # max_steps reached mid-epoch
            evaluate()
            last_checkpoint = save_resumable(ckpt_dir / f"checkpoint_step_{state['step']}.pt")
    stop.restore()
    progress.close()
    if patience and state["best_metric"] is not None and best_path.exists():
        last_metrics = _restore_best(accelerator, task.model, best_path, kind, log)
    if not last_metrics and task.val_dataset is not None and state["step"] > 0 and resume:
        evaluate()  # resumed a finished run: still report its metrics
    metrics_log.close()
    log.info("done: %d steps, best %s %s", state["step"], task.metric_for_best, state["best_metric"])
    return TrainResult(
        metrics=last_metrics,
        best_metric=state["best_metric"],
        best_model_path=best_path if best_path.exists() else None,
        last_checkpoint=last_checkpoint,
        global_step=state["step"],
        epochs_completed=state["epoch"],
        history=history,
        stopped_early=bool(state["stopped_early"]),
    )


def _restore_best(accelerator, model: nn.Module, best_path: Path, kind: str, log) -> dict[str, float]:
    """Load ``best_model.pt``'s weights into ``model`` (the unwrapped module; DDP shares its
    parameters) and return the metrics they scored. Under FSDP the module holds shards, so the
    weights stay where training left them and ``best_model.pt`` alone holds the best ones."""
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    best = load_checkpoint(best_path, kind=kind)
    if accelerator.distributed_type == DistributedType.FSDP:
        log.info("FSDP: the best weights are in %s (not loaded back into the sharded model)", best_path)
    else:
        load_trainable_state(model, best["model"], best_path)  # an adapted model's hold only the adapter
        log.info("restored the best weights (step %s) from %s", best.get("step"), best_path)
    return dict(best.get("metrics", {}))


class _StopOnSigterm:
    """While training, SIGTERM only asks to stop: the loop checks :meth:`requested` at each
    optimizer-step boundary (where a checkpoint is exact). Installed only in the main thread
    (Python delivers signals there); the previous handler comes back with :meth:`restore`."""

    def __init__(self) -> None:
        self.flag = False
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.flag:  # a second SIGTERM (or one after a failed fit left this installed): end now
            self.restore()
            os.kill(os.getpid(), signal.SIGTERM)
        self.flag = True

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.flag
        return _sum_across(accelerator, float(self.flag)) > 0  # every process stops at the same step

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
            self.installed = False


def _accumulate_gradients(task: TrainTask, model, accelerator, group: list[Batch], world: int) -> tuple[float, float, int]:
    """Forward and backward passes over the micro-batches ``group`` of one optimizer step.

    With ``task.count_items``: the items of all micro-batches of all processes are counted
    and summed across processes first, and each micro-batch's summed loss is scaled by
    ``world / global_items`` (DDP/FSDP average gradients over processes, hence ``world``), so
    the accumulated gradient is that of the global summed loss over the global item count.
    Without it: each micro-batch mean is divided by the number of micro-batches.

    Returns (this process's loss sum or sum of means, its item count or number of
    micro-batches, its token count for throughput).
    """
    tokens = sum(task.count_tokens(b) for b in group) if task.count_tokens is not None else 0
    if task.count_items is not None:
        local_items = sum(int(task.count_items(b)) for b in group)
        global_items = _sum_across(accelerator, float(local_items))
        scale = world / max(1.0, global_items)
    else:
        local_items, scale = len(group), 1.0 / len(group)
    loss_total = 0.0
    for i, batch in enumerate(group):
        batch = _move(batch, accelerator.device)
        last = i == len(group) - 1
        sync = nullcontext() if last or world == 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss = task.loss_fn(model, batch)
            accelerator.backward(loss * scale)
        loss_total += loss.detach().float().item()
    return loss_total, float(local_items), tokens


def _window_loss(accelerator, task: TrainTask, loss_total: float, weight: float) -> float:
    """The logged training loss of a window of steps: item-weighted over all processes with
    ``count_items`` (summed losses / summed items), else the mean of the micro-batch means."""
    if task.count_items is not None:
        return _sum_across(accelerator, loss_total) / max(1.0, _sum_across(accelerator, weight))
    return _mean_across(accelerator, loss_total / weight)


def _sum_across(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    # float64: item counts and loss sums must add up exactly whatever the order of processes
    tensor = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").item()


def _mean_across(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], device=accelerator.device)
    return accelerator.reduce(tensor, reduction="mean").item()


def _gather_objects(accelerator, obj: Any) -> list[Any]:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _prune_step_checkpoints(ckpt_dir: Path, keep: int) -> None:
    steps = sorted(ckpt_dir.glob("checkpoint_step_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    for old in steps[:-keep]:
        old.unlink(missing_ok=True)
