"""LoRA adapters (src/training/adapters.py) on MARK's real Mamba-2 at a tiny size: target
matching and its errors, a frozen base through the engine, merge, the disabled adapter as the
reference policy, and the PEFT round trip onto transformers' Mamba2ForCausalLM."""

import copy

import pytest
import torch

from src.core.checkpoint import load_checkpoint
from src.core.config import PathsConfig, StrictModel, SystemConfig, TrainingConfig
from src.core.errors import ConfigError
from src.mamba.generate import generate_ids, token_logprobs
from src.mamba.model import MambaArgs, MambaLM
from src.mamba.model import ADAPTER_REFUSED_TARGETS as REFUSED_TARGETS
from src.training.adapters import (
    AdapterConfig,
    adapter_disabled,
    apply_adapter,
    count_parameters,
    merge_adapter,
    resolve_targets,
    save_peft_adapter,
)
from src.training.engine import TrainTask, fit

ARGS = MambaArgs(vocab_size=64, d_model=32, n_layers=3, n_heads=4, state_size=8, chunk_size=8)


def _model(seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    return MambaLM(ARGS).eval()


def _perturb_adapter(model: MambaLM, seed: int = 1) -> None:
    """LoRA's B starts at zero (the adapter is a no-op): give it values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def test_targets_by_name_regex_and_layers():
    model = _model()
    by_name = resolve_targets(model, AdapterConfig(target_modules=["in_proj"]))
    assert by_name == [f"backbone.layers.{i}.mixer.in_proj" for i in range(3)]
    both = resolve_targets(model, AdapterConfig(target_modules=["out_proj", "in_proj"], layers=[0, 2]))
    assert both == ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
                    "backbone.layers.2.mixer.in_proj", "backbone.layers.2.mixer.out_proj"]
    regex = resolve_targets(model, AdapterConfig(target_modules=[r"backbone\.layers\.[12]\.mixer\.(in|out)_proj"]))
    assert regex == [f"backbone.layers.{i}.mixer.{p}" for i in (1, 2) for p in ("in_proj", "out_proj")]


@pytest.mark.parametrize(
    "adapter, expected",
    [
        ({"target_modules": ["in_proj", "q_proj"]}, "model.adapter.target_modules: 'q_proj' matches no module (linear layers: in_proj, lm_head, out_proj)"),
        ({"target_modules": ["in_proj"], "layers": [7]}, "'in_proj' matches no module in layers [7]"),
        ({"target_modules": [r"layers\.0\.mixer\.in_proj"]}, r"'layers\\.0\\.mixer\\.in_proj' matches no module"),  # fullmatch
        ({"target_modules": ["conv1d"]}, "backbone.layers.0.mixer.conv1d: the mixer reads the depthwise convolution's kernel directly"),
        ({"target_modules": ["lm_head"]}, "lm_head: the training loss reads lm_head.weight directly"),
        ({"target_modules": ["norm_f"]}, "'norm_f' matches backbone.norm_f, a RMSNorm; LoRA adapts linear layers only"),
    ],
)
def test_a_target_that_matches_nothing_or_cannot_be_adapted_is_one_line(adapter, expected):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError) as err:
        apply_adapter(model, AdapterConfig(**adapter), "model.adapter", REFUSED_TARGETS)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not model.has_adapter() and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_seeded_adapter_depends_on_its_seed_alone_and_leaves_the_global_rng_alone():
    def adapter_weights(seed, draws_before):
        model = _model()
        torch.rand(draws_before)  # the global RNG somewhere else, as in a second run in one process
        before = torch.random.get_rng_state()
        apply_adapter(model, AdapterConfig(r=4, target_modules=["in_proj"]), seed=seed)
        assert torch.equal(torch.random.get_rng_state(), before)
        return {k: v.clone() for k, v in model.state_dict().items() if ".lora_A." in k}

    first, second, other = adapter_weights(3, 1), adapter_weights(3, 17), adapter_weights(4, 1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_bad_regex_is_a_config_error():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        AdapterConfig(target_modules=["in_proj("])


class _Cfg(StrictModel):
    training: TrainingConfig
    paths: PathsConfig
    system: SystemConfig = SystemConfig(device="cpu", seed=3)


def _windows(n: int = 24, length: int = 17) -> list[torch.Tensor]:
    # Counting sequences (each token the previous + 1): something a few LoRA steps can learn.
    starts = torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(5))
    return [3 + (start + torch.arange(length)) % 61 for start in starts]


def _lm_task(model: MambaLM) -> TrainTask:
    def loss_fn(m, batch):
        labels = batch[:, 1:]
        return m(batch[:, :-1], labels=labels).loss * labels.numel()

    def eval_step(m, batch):
        return {"loss": [float(m(batch[:, :-1], labels=batch[:, 1:]).loss)]}

    windows = _windows()
    return TrainTask(
        name="lm", model=model, train_dataset=windows[:20], val_dataset=windows[20:], collate_fn=torch.stack,
        loss_fn=loss_fn, count_items=lambda b: b[:, 1:].numel(), eval_step=eval_step,
        compute_metrics=lambda out: {"val_loss": sum(out["loss"]) / len(out["loss"])},
    )


def _fit(model: MambaLM, tmp_path, name: str, **training) -> object:
    cfg = _Cfg(training=TrainingConfig(**{"batch_size": 4, "num_epochs": 2, "learning_rate": 1e-2, "lr_scheduler": "constant",
                                          "log_steps": 100, **training}),
               paths=PathsConfig(checkpoint_dir=tmp_path / name / "ckpt", log_dir=tmp_path / name / "logs"))
    return fit(_lm_task(model), cfg)


def test_training_changes_only_the_adapter_and_checkpoints_hold_only_it(tmp_path, caplog):
    model = _model().train()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    val = torch.stack(_windows()[20:])
    with torch.no_grad():
        base_val_loss = model.eval()(val[:, :-1], labels=val[:, 1:]).loss.item()
    with caplog.at_level("INFO"):
        apply_adapter(model, AdapterConfig(r=4, alpha=8, target_modules=["in_proj", "out_proj"], layers=[1, 2]))
    assert "LoRA r=4 alpha=8 on backbone.layers.2.mixer.out_proj" in caplog.text
    trainable, total = count_parameters(model)
    # in_proj 32 -> 148 and out_proj 64 -> 32, rank 4, two layers: 4*(32+148) + 4*(64+32) per layer
    assert trainable == 2 * (4 * (32 + 148) + 4 * (64 + 32))
    assert f"trainable parameters {trainable:,} of {total:,}" in caplog.text
    result = _fit(model, tmp_path, "lora")
    after = model.state_dict()
    for key, value in base.items():  # the frozen base, bitwise
        mapped = key.replace("in_proj.weight", "in_proj.base_layer.weight").replace("out_proj.weight", "out_proj.base_layer.weight")
        assert torch.equal(after[mapped if mapped in after else key], value), key
    lora = [k for k, p in model.named_parameters() if p.requires_grad]
    assert len(lora) == 8 and all(".lora_" in k for k in lora)
    assert any(after[k].abs().sum() > 0 for k in lora if ".lora_B." in k)  # B left zero: it trained
    for path in (result.last_checkpoint, result.best_model_path):
        assert sorted(load_checkpoint(path)["model"]) == sorted(lora)
    assert result.best_metric < base_val_loss - 0.05, (result.best_metric, base_val_loss)


def test_gradient_accumulation_with_an_adapter_equals_the_bigger_batch(tmp_path):
    runs = {}
    for name, batch, accum in (("big", 8, 1), ("acc", 4, 2)):
        model = _model().train()
        apply_adapter(model, AdapterConfig(r=4, target_modules=["in_proj"]))
        _fit(model, tmp_path, name, batch_size=batch, gradient_accumulation_steps=accum, num_epochs=1)
        runs[name] = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    assert max((runs["big"][k] - runs["acc"][k]).abs().max().item() for k in runs["big"]) < 1e-6


def test_merge_equals_unmerged_and_out_proj_works_in_marks_model():
    model = _model()
    apply_adapter(model, AdapterConfig(r=4, target_modules=["in_proj", "out_proj"]))
    _perturb_adapter(model)
    ids = torch.randint(3, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = _model()(ids).logits
        unmerged = model(ids).logits
        assert (unmerged - base_logits).abs().max() > 1e-2  # the adapter (out_proj included) changes the outputs
        # the decoding step applies the adapter too (its projections call the LoRA layers)
        stepped = generate_ids(model, [ids[0, :5].tolist()], max_new_tokens=6, temperature=0.0)
        merged_model = merge_adapter(copy.deepcopy(model))
        assert not merged_model.has_adapter()
        assert sorted(merged_model.state_dict()) == sorted(_model().state_dict())
        merged = merged_model(ids).logits
        assert generate_ids(merged_model, [ids[0, :5].tolist()], max_new_tokens=6, temperature=0.0) == stepped
    assert (merged - unmerged).abs().max().item() <= 1e-5


def test_the_disabled_adapter_is_the_frozen_reference():
    frozen = _model()
    policy = apply_adapter(_model(), AdapterConfig(r=4, target_modules=["in_proj", "out_proj"]))
    _perturb_adapter(policy)
    ids = torch.randint(3, 64, (3, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with adapter_disabled(policy):
            reference = token_logprobs(policy, ids)
        adapted = token_logprobs(policy, ids)
        expected = token_logprobs(frozen, ids)
    assert torch.equal(reference, expected)  # bitwise: the base layers compute alone
    assert (adapted - expected).abs().max() > 1e-3
    assert all(p.requires_grad == (".lora_" in n) for n, p in policy.named_parameters())


def test_peft_loads_the_adapter_on_transformers_mamba2_with_marks_logits(tmp_path):
    from peft import PeftModel
    from transformers import Mamba2ForCausalLM

    from src.mamba.export import export_hf
    from src.mamba.tokenizer import MambaTokenizer

    tokenizer = MambaTokenizer.train(["def f(x): return x + 1"] * 4, 300)
    model = MambaLM(MambaArgs(**{**ARGS.to_dict(), "vocab_size": 300})).eval()
    export_hf(model, tokenizer, tmp_path / "base")
    apply_adapter(model, AdapterConfig(r=4, alpha=16, target_modules=["in_proj"], layers=[0, 1]))
    _perturb_adapter(model)
    save_peft_adapter(model, tmp_path / "adapter", str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(Mamba2ForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    ids = torch.tensor([[1] + tokenizer.encode("def f(x): return x + 1")])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, use_cache=False).logits
        with peft_model.disable_adapter():
            assert (theirs - peft_model(input_ids=ids, use_cache=False).logits).abs().max() > 1e-3  # PEFT applied it
        diff = (theirs - model(ids).logits).abs().max().item()
    assert diff <= 1e-4
