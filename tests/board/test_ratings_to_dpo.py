"""Closing the loop: 20 pairs collected through the Chat's rating functions train DPO with the
command the README gives (``mark train --target=rlhf --method dpo training.dpo.pairs=dataset
data.preferences_train_file=<the Board's file>``), and the new aligned model is offered in Chat."""

import asyncio
import json
from pathlib import Path

import torch
import yaml

from src.api.generation import GenerationParams
from src.board.chat import ALIGNED_PREFIX, answer, sample_pair
from src.board.preferences import count_pairs, record_comparison, record_rating
from src.core.checkpoint import load_checkpoint
from src.training import orchestrator
from tests.rlhf.conftest import tiny_rlhf_config

QUESTIONS = [
    "What does a thread pool executor do?", "How is a future cancelled?", "What is an event loop?", "What does a barrier do?",
    "How are tasks scheduled?", "What is a transport?", "What does walk do in email iterators?", "What is a lock?",
    "How does a queue signal it is full?", "What is a coroutine?",
]


def test_dpo_trains_on_twenty_ui_rated_pairs(workspace, board_project: Path, sample_data_dir: Path) -> None:
    models, prefs = workspace.models, workspace.preferences_file
    params = GenerationParams(max_new_tokens=10, temperature=1.0)
    # 10 side-by-side comparisons (the first answer picked) and 10 up/down ratings of two answers.
    for i, question in enumerate(QUESTIONS):
        prompt, a, b = asyncio.run(sample_pair(models, question, model="mamba", top_k=2, mode="hybrid", params=params, seed=10 * i))
        record_comparison(prefs, prompt, a or "(empty)", b or "(no answer)")
    for i, question in enumerate(QUESTIONS):
        good = asyncio.run(answer(models, question, model="mamba", rag=False, params=GenerationParams(max_new_tokens=10, seed=i)))
        bad = asyncio.run(answer(models, question, model="mamba", rag=False, params=GenerationParams(max_new_tokens=10, seed=100 + i)))
        record_rating(prefs, good.prompt, good.text or "(empty)", up=True, model="mamba")
        record_rating(prefs, bad.prompt, bad.text if bad.text != good.text else bad.text + " (worse)", up=False, model="mamba")
    assert count_pairs(prefs) == 20

    base = workspace.checkpoints_dir / "mamba" / "best_model.pt"
    config = tiny_rlhf_config(base, sample_data_dir, board_project)
    config["training"]["dpo"].update({"max_train_examples": None, "num_epochs": 2, "batch_size": 4, "log_steps": 1})
    config_file = board_project / "rlhf.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    out = workspace.checkpoints_dir / "rlhf_board"
    torch_threads = torch.get_num_threads()
    try:
        summary = orchestrator.main([
            "train", "--target=rlhf", f"--config={config_file}", "--device=cpu", "--method", "dpo", "training.dpo.pairs=dataset",
            f"data.preferences_train_file={prefs}", f"paths.checkpoint_dir={out}", f"paths.log_dir={board_project / 'logs' / 'rlhf_board'}",
        ])
    finally:
        torch.set_num_threads(torch_threads)
    dpo = summary["metrics"]["dpo"]
    assert dpo["pairs"] == "dataset" and dpo["train_examples"] == 20 and dpo["global_step"] == 10  # 2 epochs of 5 batches
    records = [json.loads(line) for line in (board_project / "logs" / "rlhf_board" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 10 and all(loss > 0 for loss in losses)
    assert summary["metrics"]["export"]["policy"] == "dpo"  # the served policy of this folder is the new DPO model
    load_checkpoint(out / "rlhf_final_model.pt", kind="rlhf")
    # The Chat tab offers the new model and answers with it.
    assert f"{ALIGNED_PREFIX}rlhf_board" in models.choices()
    reply = asyncio.run(answer(models, QUESTIONS[0], model=f"{ALIGNED_PREFIX}rlhf_board", rag=False, params=params))
    assert reply.done and reply.model == f"{ALIGNED_PREFIX}rlhf_board"
