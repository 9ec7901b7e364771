"""The HF and GGUF exports of a trained MARK Mamba-2 (src/mamba/export.py): transformers loads
the HF folder with MARK's logits and greedy tokens; gguf's reader reads the GGUF file back."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from src.mamba import generate_ids, load_mamba
from src.mamba.export import ExportError, export_gguf, export_hf
from src.mamba.tokenizer import MambaTokenizer
from src.scripts.train_mamba import main

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["import json\n\ndef load(path):", "The configuration file", "class Parser:\n    def __init__(self"]


@pytest.fixture(scope="module")
def trained(sample_data_dir, tmp_path_factory):
    """A tiny MARK Mamba-2 trained for 2 epochs on a slice of the sample corpus: (model, tokenizer)."""
    folder = tmp_path_factory.mktemp("export_run")
    for name, count, chars in (("lm_train.jsonl", 12, 3000), ("lm_val.jsonl", 3, 2000)):
        docs = [json.loads(line) for line in (sample_data_dir / name).read_text().splitlines()[:count]]
        (folder / name).write_text("".join(json.dumps({**d, "text": d["text"][:chars]}) + "\n" for d in docs))
    threads = torch.get_num_threads()
    main([
        "--config", str(REPO / "configs" / "mamba_train.yaml"), "--device", "cpu",
        f"data.train_file={folder / 'lm_train.jsonl'}", f"data.val_file={folder / 'lm_val.jsonl'}",
        f"paths.checkpoint_dir={folder / 'ckpt'}", f"paths.log_dir={folder / 'logs'}",
        "model.vocab_size=420", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_groups=2",
        "model.state_size=8", "model.max_length=64", "model.chunk_size=16", "training.batch_size=8",
        "training.num_epochs=2", "training.learning_rate=0.003", "training.warmup_steps=2", "training.torch_threads=1",
    ])
    torch.set_num_threads(threads)
    return load_mamba(folder / "ckpt")


def test_hf_export_loads_in_transformers_with_marks_logits_and_greedy_tokens(trained, tmp_path):
    from transformers import AutoTokenizer, Mamba2Config, Mamba2ForCausalLM

    model, tokenizer = trained
    out = export_hf(model, tokenizer, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    )
    config = json.loads((out / "config.json").read_text())
    assert set(Mamba2Config().to_dict()) - set(config) <= {"transformers_version"}  # every key explicit
    assert (config["hidden_size"], config["n_groups"], config["num_heads"], config["vocab_size"]) == (32, 2, 4, model.args.vocab_size)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)

    hf_model = Mamba2ForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    for prompt in PROMPTS:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        assert hf_tok(prompt).input_ids == ids  # the exported tokenizer prepends bos as MARK does
        assert hf_tok.decode(ids, skip_special_tokens=True) == prompt
        x = torch.tensor([ids])
        with torch.no_grad():
            assert (hf_model(x, use_cache=False).logits - model(x).logits).abs().max().item() <= 1e-4
        mine = generate_ids(model, [ids], 64, temperature=0.0, eos_id=-1)[0]
        with torch.no_grad():
            theirs = hf_model.generate(x, max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
        assert len(mine) == 64 and mine == theirs


def test_hf_export_replaces_an_older_export_and_refuses_nothing_half_written(trained, tmp_path):
    model, tokenizer = trained
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.bin").write_text("from an older export")
    export_hf(model, tokenizer, out)
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".hf.*"))  # no staging folder left


def test_gguf_reads_back_with_the_architecture_tensors_and_vocabulary(trained, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    model, tokenizer = trained
    args = model.args
    sizes = {}
    for dtype in ("f32", "f16", "q8_0"):
        path = export_gguf(model, tokenizer, tmp_path / f"mamba-{dtype}.gguf", dtype)
        sizes[dtype] = path.stat().st_size
        reader = GGUFReader(path)
        field = lambda key: reader.fields[key].contents()  # noqa: E731
        assert field("general.architecture") == "mamba2"
        assert field("mamba2.block_count") == args.n_layers and field("mamba2.embedding_length") == args.d_model
        assert field("mamba2.ssm.inner_size") == args.d_inner and field("mamba2.ssm.group_count") == args.n_groups
        assert field("mamba2.ssm.state_size") == args.state_size and field("mamba2.ssm.time_step_rank") == args.n_heads
        assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
        tokens = field("tokenizer.ggml.tokens")
        assert len(tokens) == args.vocab_size
        assert tokens[:4] == ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
        assert all(tokens[i] == tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size))
        merges = field("tokenizer.ggml.merges")
        assert len(merges) == tokenizer.vocab_size - 4 - 256 and all(len(m.split(" ")) == 2 for m in merges)
        assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.padding_token_id")) == (1, 2, 0)
        tensors = {t.name: t for t in reader.tensors}
        expected = {"token_embd.weight", "output_norm.weight"} | {
            f"blk.{i}.{n}" for i in range(args.n_layers) for n in (
                "attn_norm.weight", "ssm_in.weight", "ssm_conv1d.weight", "ssm_conv1d.bias", "ssm_dt.bias",
                "ssm_a", "ssm_d", "ssm_norm.weight", "ssm_out.weight")
        }
        assert set(tensors) == expected  # tied embeddings: no output.weight
        A = tensors["blk.1.ssm_a"]
        assert A.tensor_type == GGMLQuantizationType.F32
        np.testing.assert_allclose(np.asarray(A.data).reshape(-1), -torch.exp(model.backbone.layers[1].mixer.A_log).detach().numpy(), rtol=1e-6)
        embd = tensors["token_embd.weight"]
        want = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0}[dtype]
        assert embd.tensor_type == want and list(embd.shape) == [args.d_model, args.vocab_size]
        if dtype != "q8_0":
            np.testing.assert_allclose(np.asarray(embd.data, dtype=np.float32), model.backbone.embeddings.weight.detach().numpy(),
                                       atol=1e-3 if dtype == "f16" else 0)
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_gguf_refuses_a_tokenizer_llama_cpp_would_split_differently(trained, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model, _ = trained
    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(["some words for a tokenizer"] * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "</s>"], show_progress=False))
    other = MambaTokenizer.from_hf(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]"))
    with pytest.raises(ExportError, match="pre-tokenizer is 'Whitespace', not GPT-2's byte-level one"):
        export_gguf(model, other, tmp_path / "bad.gguf")
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ExportError, match="dtype 'q4'"):
        export_gguf(model, trained[1], tmp_path / "bad.gguf", "q4")
