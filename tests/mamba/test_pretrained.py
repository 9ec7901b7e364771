"""Starting from a pretrained Mamba-2 (src/mamba/pretrained.py, the tokenizer adapter in
src/mamba/tokenizer.py, ``model.pretrained`` in src/mamba/train.py): tiny checkpoints written
by the test in both layouts load with the same logits, then train with falling loss."""

import json
import math
from pathlib import Path

import pytest
import torch

from src.core.checkpoint import load_checkpoint
from src.core.cli import run_cli
from src.data.readers import read_documents
from src.mamba import generate, load_mamba
from src.mamba.data import TokenWindows, collate_windows, pack_documents
from src.mamba.pretrained import load_pretrained
from src.mamba.tokenizer import MambaTokenizer
from src.scripts.train_mamba import main
from tests.mamba.pretrained_folders import save_hf_mamba2, save_mamba_ssm_folder, save_neox_style_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(sample_data_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pretrained_corpus")
    for name, count, chars in (("lm_train.jsonl", 12, 3000), ("lm_val.jsonl", 3, 2000)):
        docs = [json.loads(line) for line in (sample_data_dir / name).read_text().splitlines()[:count]]
        for doc in docs:
            doc["text"] = doc["text"][:chars]
        (folder / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
    return folder


@pytest.fixture(scope="module")
def folders(corpus, tmp_path_factory):
    """(hf folder, its reference model, mamba_ssm folder, its reference model, tokenizer folder)."""
    root = tmp_path_factory.mktemp("pretrained")
    texts = [d.text for d in read_documents(corpus / "lm_train.jsonl")]
    tokenizer = save_neox_style_tokenizer(texts, root / "neox_tokenizer", vocab_size=400)
    # untied, 2 groups, vocabulary padded past the tokenizer's 400 tokens
    hf_model = save_hf_mamba2(root / "hf", vocab_size=416, tied=False, n_groups=2, tokenizer=tokenizer)
    ssm_model = save_mamba_ssm_folder(root / "mamba_ssm", vocab_size=len(tokenizer), pad_multiple=32)
    return root / "hf", hf_model, root / "mamba_ssm", ssm_model, root / "neox_tokenizer"


def _argv(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "mamba_train.yaml"), "--device", "cpu",
        f"data.train_file={corpus / 'lm_train.jsonl'}", f"data.val_file={corpus / 'lm_val.jsonl'}",
        f"paths.checkpoint_dir={out / 'ckpt'}", f"paths.log_dir={out / 'logs'}",
        "model.max_length=64", "model.chunk_size=16", "training.batch_size=8", "training.num_epochs=1",
        "training.learning_rate=0.003", "training.warmup_steps=2", "training.log_steps=2", "training.eval_steps=0",
        "training.torch_threads=1", *extra,
    ]


def _val_loss(model, tokenizer, corpus: Path) -> float:
    stream = pack_documents(read_documents(corpus / "lm_val.jsonl"), tokenizer)
    windows = TokenWindows(stream, 64, tokenizer.pad_id)
    batch = collate_windows([windows[i] for i in range(len(windows))])
    with torch.no_grad():
        return model(batch["input_ids"], labels=batch["labels"]).loss.item()


@pytest.mark.parametrize("layout", ["hf", "mamba_ssm"])
def test_checkpoint_loads_with_the_logits_of_transformers(layout, folders):
    hf_dir, hf_model, ssm_dir, ssm_model, tok_dir = folders
    if layout == "hf":
        model, tokenizer, ckpt = load_pretrained(str(hf_dir))
        reference = hf_model
        assert ckpt.layout == "transformers" and not ckpt.args.tie_embeddings and ckpt.args.n_groups == 2
    else:
        model, tokenizer, ckpt = load_pretrained(str(ssm_dir), tokenizer=str(tok_dir))
        reference = ssm_model
        assert ckpt.layout == "mamba_ssm" and ckpt.args.tie_embeddings
        assert model.lm_head.weight is model.backbone.embeddings.weight
    assert ckpt.args.vocab_size == 416 and tokenizer.vocab_size == 400  # padded vocabulary
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 0, 1)
    text = "def parse(path):\n    return json.loads(open(path).read())"
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text)])
    assert tokenizer.decode(ids[0].tolist()) == text
    with torch.no_grad():
        mine = model.eval()(ids).logits
        theirs = reference(ids, use_cache=False).logits
    assert mine.shape == theirs.shape == (1, ids.shape[1], 416)
    assert (mine - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", ["hf", "mamba_ssm"])
def test_training_from_a_pretrained_checkpoint_lowers_the_loss(layout, folders, corpus, tmp_path, caplog):
    hf_dir, _, ssm_dir, _, tok_dir = folders
    extra = [f"model.pretrained={hf_dir}"] if layout == "hf" else [f"model.pretrained={ssm_dir}", f"model.tokenizer={tok_dir}"]
    start_model, start_tok, _ = load_pretrained(*( [str(hf_dir)] if layout == "hf" else [str(ssm_dir), str(tok_dir)]), chunk_size=16)
    before = _val_loss(start_model.eval(), start_tok, corpus)

    with caplog.at_level("INFO"):
        summary = main(_argv(corpus, tmp_path, *extra))
    assert "model.pretrained overrides the config: model.vocab_size 5000 -> 416" in caplog.text
    assert "model.d_model 256 -> 32" in caplog.text
    logs = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in logs if e["kind"] == "train" and "loss" in e]
    assert len(train_losses) >= 3 and train_losses[-1] < train_losses[0]
    after = summary["metrics"]["val_loss"]
    assert after < before - 0.3, (before, after)

    model, tokenizer = load_mamba(tmp_path / "ckpt" / "best_model.pt")
    assert tokenizer.fingerprint() == start_tok.fingerprint() and tokenizer.is_pretrained
    assert model.args.vocab_size == 416 and model.args.n_groups == (2 if layout == "hf" else 1)
    assert math.isclose(_val_loss(model, tokenizer, corpus), after, rel_tol=1e-4)
    assert isinstance(generate(model, tokenizer, "def ", max_new_tokens=8, temperature=0.0), str)
    assert MambaTokenizer.from_file(tmp_path / "ckpt" / "vocab.json").fingerprint() == tokenizer.fingerprint()
    assert load_checkpoint(tmp_path / "ckpt" / "best_model.pt", kind="mamba")["extra"]["model_args"]["tie_embeddings"] == (layout != "hf")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["model.pretrained=state-spaces/mamba2-130m"], "model.pretrained: cannot fetch 'state-spaces/mamba2-130m'"),
        (["model.pretrained=/nonexistent/mamba2"], "model.pretrained: /nonexistent/mamba2: no such folder"),
        (["model.pretrained={ssm}"], "set model.tokenizer"),
        (["model.pretrained={ssm}", "model.tokenizer=EleutherAI/gpt-neox-20b"], "model.tokenizer: cannot fetch"),
    ],
)
def test_bad_pretrained_is_one_line_exit_2(extra, expected, folders, corpus, tmp_path, capsys):
    extra = [e.format(ssm=folders[2]) for e in extra]
    code = run_cli(main, _argv(corpus, tmp_path / "out", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and expected in err and "\n" not in err
    if "cannot fetch" in expected:
        assert "point" in err and "local folder" in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_mark_cannot_compute_is_refused(folders, tmp_path):
    from src.core.errors import ConfigError

    ssm_dir = folders[2]
    bad = tmp_path / "with_mlp"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes((ssm_dir / "pytorch_model.bin").read_bytes())
    config = json.loads((ssm_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "d_intermediate": 64}))
    with pytest.raises(ConfigError, match="d_intermediate=64 \\(MLP blocks\\)"):
        load_pretrained(str(bad), tokenizer=str(folders[4]))


def test_a_hf_tokenizer_can_replace_marks_bpe_for_a_new_model(folders, corpus, tmp_path):
    tok_dir = folders[4]
    summary = main(_argv(corpus, tmp_path, f"model.tokenizer={tok_dir}", "model.d_model=32", "model.n_layers=1",
                         "model.n_heads=2", "model.state_size=8"))
    model, tokenizer = load_mamba(tmp_path / "ckpt")
    assert tokenizer.is_pretrained and model.args.vocab_size == tokenizer.vocab_size == 400
    assert summary["metrics"]["val_loss"] < summary["metrics"]["unigram_val_loss"] + 1.0
    assert tokenizer.encode("import os") == MambaTokenizer.from_pretrained(tok_dir).encode("import os")


def test_an_imported_checkpoint_exports_back_to_transformers_and_gguf_unchanged(folders, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer, Mamba2ForCausalLM

    from src.mamba.export import export_gguf, export_hf

    hf_dir, reference, ssm_dir, _, tok_dir = folders
    model, tokenizer, _ = load_pretrained(str(hf_dir))
    out = export_hf(model, tokenizer, tmp_path / "hf")
    again = Mamba2ForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "return self.value"
    assert hf_tok(text).input_ids == tokenizer.encode(text)  # a pretrained tokenizer is written as it came
    ids = torch.tensor([[0] + tokenizer.encode(text)])
    with torch.no_grad():
        assert (again(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "<|padding|>"
    # mamba_ssm in, GGUF out: 416 rows, 400 tokens + 16 [PADn]
    model, tokenizer, _ = load_pretrained(str(ssm_dir), tokenizer=str(tok_dir))
    tokens = GGUFReader(export_gguf(model, tokenizer, tmp_path / "m.gguf")).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 416 and tokens[400] == "[PAD400]" and tokens[0] == "<|endoftext|>"


def test_lora_fine_tuning_of_a_pretrained_folder_then_peft_and_merged_exports(folders, corpus, tmp_path, caplog):
    """``--target=mamba`` with ``model.adapter`` (src/training/adapters.py): the checkpoint holds
    only the adapter, the base stays the folder's, and the adapter leaves as PEFT (peft on
    Mamba2ForCausalLM gives MARK's logits) and merged (hf, gguf)."""
    from gguf import GGUFReader

    from src.pipelines.export import export_model
    from src.training import orchestrator
    from src.training.adapters import merge_adapter

    hf_dir = folders[0]
    start_model, start_tok, _ = load_pretrained(str(hf_dir), chunk_size=16)
    before = _val_loss(start_model.eval(), start_tok, corpus)
    adapter = "model.adapter={r: 8, alpha: 16, target_modules: [in_proj]}"
    with caplog.at_level("INFO"):
        summary = orchestrator.main(["train", "--target=mamba", *_argv(corpus, tmp_path, f"model.pretrained={hf_dir}", adapter,
                                                                  "training.learning_rate=0.03")])
    assert "LoRA r=8 alpha=16 on backbone.layers.1.mixer.in_proj" in caplog.text
    metrics = summary["metrics"]
    assert metrics["trainable_parameters"] == 2 * 8 * (32 + 2 * 64 + 2 * 2 * 8 + 4)  # r * (in + out) per in_proj
    assert metrics["val_loss"] < before - 0.1, (before, metrics["val_loss"])
    best = tmp_path / "ckpt" / "best_model.pt"
    assert all(".lora_" in k for k in load_checkpoint(best)["model"])  # only the adapter, not the base
    assert best.stat().st_size < 100_000

    model, tokenizer = load_mamba(tmp_path / "ckpt")  # base folder + adapter, unmerged (load_model and the server)
    assert model.has_adapter()
    assert math.isclose(_val_loss(model, tokenizer, corpus), metrics["best_val_loss"], rel_tol=1e-4)
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("def parse(path):")])
    with torch.no_grad():
        unmerged = model(ids).logits
        merged_model = merge_adapter(load_mamba(tmp_path / "ckpt")[0])
        assert (merged_model(ids).logits - unmerged).abs().max().item() <= 1e-5

    peft = export_model("mamba", "peft", tmp_path / "peft", tmp_path / "ckpt")
    assert peft["metrics"]["max_abs_diff"] <= 1e-4 and peft["outputs"]["base"] == str(hf_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "peft").iterdir()}
    assert export_model("mamba", "hf", tmp_path / "hf", tmp_path / "ckpt")["metrics"]["max_abs_diff"] <= 1e-4
    gguf = export_model("mamba", "gguf", tmp_path / "m.gguf", tmp_path / "ckpt")["outputs"]["gguf"]
    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    written = torch.tensor(tensors["blk.1.ssm_in.weight"].data.copy()).reshape(merged_model.backbone.layers[1].mixer.in_proj.weight.shape)
    assert torch.equal(written, merged_model.backbone.layers[1].mixer.in_proj.weight.detach())  # the merged weights


def test_an_out_proj_adapter_trains_in_mark_but_exports_merged_only(folders, corpus, tmp_path, capsys):
    """LoRA on out_proj works in MARK's Mamba (its forward calls out_proj as a module, unlike
    transformers' fused CUDA path, which PEFT therefore refuses: PR 2562); --format peft says so."""
    hf_dir = folders[0]
    adapter = "model.adapter={r: 4, target_modules: [out_proj], layers: [1]}"
    main(_argv(corpus, tmp_path, f"model.pretrained={hf_dir}", adapter, "training.max_steps=4"))
    model, _ = load_mamba(tmp_path / "ckpt")
    assert model.adapter_modules == ["backbone.layers.1.mixer.out_proj"]
    assert float(model.backbone.layers[1].mixer.out_proj.lora_B["default"].weight.abs().sum()) > 0  # it trained
    from src.training import orchestrator

    capsys.readouterr()  # the training's log lines
    code = run_cli(orchestrator.main, ["export", "--model", "mamba", "--format", "peft", "--output", str(tmp_path / "peft"),
                                       "--source", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --format peft: "), err
    assert "PEFT refuses LoRA on out_proj/conv1d for Mamba-2 models" in err and "export --format hf or gguf" in err
    assert not (tmp_path / "peft").exists()
    from src.pipelines.export import export_model

    assert export_model("mamba", "hf", tmp_path / "hf", tmp_path / "ckpt")["metrics"]["max_abs_diff"] <= 1e-4
