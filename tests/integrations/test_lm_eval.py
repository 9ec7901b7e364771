"""lm-evaluation-harness (``lm_eval --model local-completions``) scores a MARK model through
the server's /v1/completions (echo + logprobs) and /tokenize, /detokenize, /tokenizer_info
(its remote tokenizer), and gets the accuracy MARK's own in-process scoring gets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from src.mamba import load_mamba

TASK_DIR = Path(__file__).parent / "lm_eval_task"
LM_EVAL = Path(sys.executable).parent / "lm_eval"


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """MARK's own scoring of a choice: log p(continuation | <|bos|> context), in this process."""
    context_ids = [tokenizer.bos_id] + tokenizer.encode(context)
    ids = context_ids + tokenizer.encode(continuation)
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(ids[1:])
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(context_ids) - 1 :].sum())


@pytest.mark.slow
def test_lm_eval_accuracy_equals_in_process_scoring(server, tiny_checkpoints, tmp_path):
    task = tmp_path / "task"
    shutil.copytree(TASK_DIR, task)
    config = yaml.safe_load((task / "mark_topic.yaml").read_text())
    choices = config["doc_to_choice"]
    docs = [json.loads(line) for line in (task / "mark_topic.jsonl").read_text().splitlines()]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    began = time.monotonic()
    result = subprocess.run(
        [str(LM_EVAL), "--model", "local-completions", "--model_args",
         f"model=mamba,base_url={server.url}/v1/completions,tokenizer_backend=remote,num_concurrent=1,max_retries=1",
         "--tasks", "mark_topic", "--include_path", str(task), "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=task, env=env, capture_output=True, text=True, timeout=300,
    )
    print(f"lm_eval: {time.monotonic() - began:.0f}s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["mark_topic"]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_mark_topic_*.jsonl")).read_text().splitlines()]
    assert results["sample_len"] == len(docs) == len(samples)

    model, tokenizer = load_mamba(tiny_checkpoints / "mamba", "cpu")
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        assert context == f"Sentence: {doc['text']}\nTopic:"
        mine = [continuation_loglikelihood(model, tokenizer, context, " " + choice) for choice in choices]
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        np.testing.assert_allclose(theirs, mine, atol=1e-3)  # the server's echo logprobs are the model's
        correct += int(np.argmax(mine)) == doc["label"]
    mine_accuracy = correct / len(docs)
    print(f"mark_topic accuracy: lm-eval {results['acc,none']:.4f}, in-process {mine_accuracy:.4f}, chance {1 / len(choices):.4f}")
    assert results["acc,none"] == pytest.approx(mine_accuracy, abs=1e-9)
