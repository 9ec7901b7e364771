"""llama.cpp itself runs MARK's GGUF export (src/mamba/export.py:export_gguf): same token ids
as MARK on 20 sample texts, same 32 greedy tokens on 3 prompts (f32), and the f16/q8_0
files load and agree on the first token; a LoRA fine-tune of a transformers-layout folder, exported
merged, and the LoRA RLHF chain's policy give llama.cpp the adapted models' greedy tokens. ``make test-gguf`` (llama-cpp-python is built from
source, so this is not part of ``make test``)."""

import json

import numpy as np
import pytest

from src.mamba import generate_ids
from src.mamba.export import export_gguf
from tests.mamba.test_export import PROMPTS, trained  # noqa: F401  (the trained tiny model)
from tests.mamba.test_pretrained import _argv, corpus, folders  # noqa: F401  (a transformers-layout folder)
from tests.rlhf.test_train import lora_chain, pretrained_hf_folder  # noqa: F401  (issue 24's LoRA chain)

pytestmark = pytest.mark.slow


def _llama(path):
    # imported here, so `make test` deselects this file without reporting a skip
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-gguf installs it)")
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, verbose=False, seed=0)


def _greedy(llm, ids: list[int], steps: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def test_llama_cpp_tokenizes_and_generates_like_mark(trained, sample_data_dir, tmp_path):  # noqa: F811
    model, tokenizer = trained
    llm = _llama(export_gguf(model, tokenizer, tmp_path / "mamba-f32.gguf", "f32"))
    assert llm.n_vocab() == model.args.vocab_size
    docs = [json.loads(line)["text"] for line in (sample_data_dir / "lm_val.jsonl").read_text().splitlines()]
    texts = [d[:600] for d in docs[:17]] + ["  two  spaces\tand a tab\n\n", "unicode: café – naïve ✓", "x = {'a': [1, 2]}  # 3's"]
    assert len(texts) == 20
    for text in texts:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tokenizer.encode(text), text[:60]
        assert llm.detokenize(tokenizer.encode(text)).decode("utf-8") == text
    assert llm.tokenize(b"def f", add_bos=True)[0] == tokenizer.bos_id
    for prompt in PROMPTS:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        mine = generate_ids(model, [ids], 32, temperature=0.0, eos_id=-1)[0]
        assert _greedy(llm, ids, 32) == mine, prompt


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_runs_the_smaller_types(dtype, trained, tmp_path):  # noqa: F811
    model, tokenizer = trained
    llm = _llama(export_gguf(model, tokenizer, tmp_path / f"mamba-{dtype}.gguf", dtype))
    agree = 0
    for prompt in PROMPTS:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        agree += _greedy(llm, ids, 1) == generate_ids(model, [ids], 1, temperature=0.0, eos_id=-1)[0]
    assert agree >= 2  # rounding may flip a near-tie, not the model


def test_llama_cpp_runs_a_lora_fine_tune_exported_merged(folders, corpus, tmp_path):  # noqa: F811
    """Issue 24's last mile: a transformers-layout Mamba-2 folder LoRA-tuned by ``--target=mamba``
    (in_proj and out_proj: out_proj exports merged only), ``mark export --format gguf`` merges the
    adapter, and llama.cpp gives the same 24 greedy tokens as MARK's unmerged base + adapter."""
    from src.mamba import load_mamba
    from src.pipelines.export import export_model
    from src.training import orchestrator
    from src.training.adapters import unload_adapter

    hf_dir = folders[0]
    adapter = "model.adapter={r: 8, alpha: 16, target_modules: [in_proj, out_proj]}"
    orchestrator.main(["train", "--target=mamba", *_argv(corpus, tmp_path, f"model.pretrained={hf_dir}", adapter,
                                                         "training.learning_rate=0.03")])
    model, tokenizer = load_mamba(tmp_path / "ckpt")
    assert model.has_adapter()
    base = unload_adapter(load_mamba(tmp_path / "ckpt")[0])  # the pretrained folder's weights, without the adapter
    gguf = export_model("mamba", "gguf", tmp_path / "lora.gguf", tmp_path / "ckpt")["outputs"]["gguf"]
    llm = _llama(gguf)
    differs = 0
    for prompt in PROMPTS:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        mine = generate_ids(model, [ids], 24, temperature=0.0, eos_id=-1)[0]
        differs += mine != generate_ids(base, [ids], 24, temperature=0.0, eos_id=-1)[0]
        assert _greedy(llm, ids, 24) == mine, prompt
    assert differs >= 1  # the adapter changed what the model says, and llama.cpp says it too


def test_llama_cpp_runs_the_lora_rlhf_chain_exported_merged(pretrained_hf_folder, sample_data_dir, tmp_path):  # noqa: F811
    """Issue 24's chain end to end: a transformers-layout folder, LoRA by ``--target=mamba``, then
    SFT, the reward model and DPO with adapters (tests/rlhf/test_train.py:lora_chain); the served
    policy (the SFT weights merged + DPO's adapter, unmerged) exported as GGUF (merged) gives
    llama.cpp the same 24 greedy tokens as MARK."""
    from src.pipelines.export import export_model
    from src.rlhf.load import load_rlhf_model

    lora_chain(pretrained_hf_folder, sample_data_dir, tmp_path)
    policy, tokenizer = load_rlhf_model(tmp_path / "rlhf")
    assert policy.has_adapter()
    gguf = export_model("rlhf", "gguf", tmp_path / "rlhf.gguf", tmp_path / "rlhf")["outputs"]["gguf"]
    llm = _llama(gguf)
    for prompt in ("What does json.dumps do?\n", "How do I read a file?\n", "def parse(path):"):
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        assert _greedy(llm, ids, 24) == generate_ids(policy, [ids], 24, temperature=0.0, eos_id=-1)[0], prompt
