"""SFT (src/rlhf/sft.py) and the shared prompt/response encoding (src/rlhf/data.py)."""

import torch
import torch.nn.functional as F

from src.core.checkpoint import load_checkpoint
from src.core.config import PathsConfig, SystemConfig
from src.data.readers import read_sft
from src.mamba.data import IGNORE_INDEX
from src.mamba.load import load_mamba
from src.rlhf.config import RLHFModelConfig, SFTConfig, StageConfig
from src.rlhf.data import PromptFormat, SFTDataset, collate_sft
from src.rlhf.sft import response_loss, train_sft


def test_prompt_format_adds_bos_and_eos_and_cuts(tiny_base_model):
    _, tok = load_mamba(tiny_base_model)
    fmt = PromptFormat(tok, "Q: {prompt}\n", max_prompt_tokens=64, max_response_tokens=64)
    prompt = fmt.prompt_ids("What does json.dumps do?")
    assert prompt[0] == tok.bos_id and tok.decode(prompt) == "Q: What does json.dumps do?\n"
    response = fmt.response_ids("Serialize obj.")
    assert response[-1] == tok.eos_id and tok.decode(response) == "Serialize obj."
    short = PromptFormat(tok, max_prompt_tokens=3, max_response_tokens=2)
    assert len(short.prompt_ids("What does json.dumps do?")) == 3
    cut = short.response_ids("Serialize obj to a JSON formatted str.")
    assert len(cut) == 2 and tok.eos_id not in cut  # cut off: it did not end there


def test_collate_labels_only_response_tokens():
    items = [([1, 10, 11], [20, 21, 2]), ([1, 12], [22, 2])]
    batch = collate_sft(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, 21], [1, 12, 22, 2, 0]]
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [[ignore, ignore, 20, 21, 2], [ignore, 22, 2, ignore, ignore]]


def test_sft_loss_ignores_prompt_tokens(tiny_base_model, sample_data_dir):
    model, tok = load_mamba(tiny_base_model)
    fmt = PromptFormat(tok)
    dataset = SFTDataset(read_sft(sample_data_dir / "sft_train.jsonl")[:4], fmt)
    batch = collate_sft([dataset[i] for i in range(4)], tok.pad_id)

    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep_logits)
    loss = response_loss(model, batch)
    loss.backward()
    handle.remove()

    grad = captured["logits"].grad.abs().sum(-1)  # (B, T): gradient reaching each position's logits
    response = batch["labels"] != IGNORE_INDEX
    assert (grad[~response] == 0).all(), "prompt and padding positions must not reach the loss"
    assert (grad[response] > 0).all()
    # and the value is the mean cross-entropy over response tokens only
    logits = captured["logits"].detach()
    per_token = F.cross_entropy(logits.transpose(1, 2), batch["labels"].clamp_min(0), reduction="none")
    assert torch.isclose(loss.detach(), per_token[response].mean(), atol=1e-5)
    assert not torch.isclose(loss.detach(), per_token.mean(), atol=1e-3)


def test_train_sft_lowers_response_loss_and_writes_a_mamba_checkpoint(tiny_base_model, sample_data_dir, tmp_path):
    model, tok = load_mamba(tiny_base_model)
    stage = StageConfig(
        stage="sft",
        training=SFTConfig(batch_size=8, num_epochs=2, learning_rate=0.003, max_train_examples=64, max_val_examples=16, log_steps=4),
        model=RLHFModelConfig(max_prompt_tokens=24, max_response_tokens=16),
        paths=PathsConfig(checkpoint_dir=tmp_path / "sft", log_dir=tmp_path / "logs"),
        system=SystemConfig(device="cpu", seed=0),
        output_file=tmp_path / "sft_model.pt",
        inputs={"base_model": "test"},
    )
    summary = train_sft(model, tok, read_sft(sample_data_dir / "sft_train.jsonl"), read_sft(sample_data_dir / "sft_val.jsonl"), stage)
    metrics = summary["metrics"]
    assert metrics["val_loss"] < metrics["base_val_loss"]
    loaded, loaded_tok = load_mamba(tmp_path / "sft_model.pt")  # the SFT model is a Mamba LM checkpoint
    assert loaded_tok.fingerprint() == tok.fingerprint()
    assert load_checkpoint(tmp_path / "sft_model.pt")["rlhf"]["stage"] == "sft"
    assert (tmp_path / "logs" / "train.log").is_file() and (tmp_path / "logs" / "metrics.jsonl").is_file()
    assert (tmp_path / "sft" / "best_model.pt").is_file()
