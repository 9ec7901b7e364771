"""Token-exact loss normalisation of the engine (``TrainTask.count_items``) on deliberately
unequal micro-batches: the Mamba LM with a padded last window and SFT with responses of
different lengths (tests/training/exact_loss_script.py builds both from the real components).

Gradient accumulation 2 x 4 and 2 processes x 4 (DDP over gloo) must train exactly as one
batch of 8, with a LoRA adapter too (``mamba_lora``: only the adapter trains); the engine's former mean of micro-batch means does not, and the tests show it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.core.checkpoint import load_checkpoint

from tests.training.exact_loss_script import train

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "tests" / "training" / "exact_loss_script.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained(sample_data_dir, tmp_path_factory) -> Path:
    """A tiny transformers-layout Mamba-2 folder with its tokenizer, for the LoRA task."""
    from src.data.readers import read_documents
    from tests.mamba.pretrained_folders import save_hf_mamba2, save_neox_style_tokenizer

    root = tmp_path_factory.mktemp("exact_loss_pretrained")
    texts = [d.text[:3000] for d in read_documents(sample_data_dir / "lm_train.jsonl")][:40]
    save_hf_mamba2(root / "hf", vocab_size=300, tied=True, n_groups=1,
                   tokenizer=save_neox_style_tokenizer(texts, root / "tokenizer", vocab_size=300))
    return root / "hf"


def _folder(task: str, request) -> Path | None:
    return request.getfixturevalue("pretrained") if task == "mamba_lora" else None


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _train_losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("task", ["mamba", "mamba_lora", "sft"])
def test_accumulation_of_unequal_micro_batches_equals_one_big_batch(task, sample_data_dir, tmp_path, request):
    folder = _folder(task, request)
    big = train(task, sample_data_dir, tmp_path / "big", batch=8, accum=1, pretrained=folder)
    accumulated = train(task, sample_data_dir, tmp_path / "accum", batch=4, accum=2, pretrained=folder)
    assert _max_diff(accumulated, big) < 1e-6
    # metrics.jsonl rounds losses to 6 decimals: equal losses may land one unit apart.
    assert _train_losses(tmp_path / "accum") == pytest.approx(_train_losses(tmp_path / "big"), abs=2e-6)
    # The former normalisation (each micro-batch's mean, averaged) is measurably off here.
    mean_of_means = train(task, sample_data_dir, tmp_path / "mean", batch=4, accum=2, mean=True, pretrained=folder)
    assert _max_diff(mean_of_means, big) > 1e-4


@pytest.mark.parametrize("task", ["mamba", "mamba_lora", "sft"])
def test_two_processes_on_unequal_micro_batches_equal_one_process(task, sample_data_dir, tmp_path, request):
    """`accelerate launch --num_processes 2` (DDP over gloo on CPU), batch 4 per process,
    against one process with batch 8: the item count is all-reduced before the backward passes."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              SCRIPT, task, str(sample_data_dir), str(tmp_path / "ddp"), "4", "1"]
    folder = _folder(task, request)
    launch += ["--pretrained", str(folder)] if folder else []
    two = subprocess.run(launch, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 process(es)" in (tmp_path / "ddp" / "logs" / "train.log").read_text()
    one = train(task, sample_data_dir, tmp_path / "one", batch=8, accum=1, pretrained=folder)
    ddp = load_checkpoint(tmp_path / "ddp" / "ckpt" / "checkpoint_epoch_1.pt")["model"]
    if task == "mamba_lora":  # only the adapter trained and was saved, and it moved
        assert ddp and all(".lora_" in k for k in ddp) and max(v.abs().max().item() for k, v in ddp.items() if "lora_B" in k) > 0
    assert _max_diff(ddp, one) < 1e-6
    assert _train_losses(tmp_path / "ddp") == pytest.approx(_train_losses(tmp_path / "one"), abs=2e-6)  # 6-decimal logs
