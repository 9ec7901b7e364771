"""The export stage's Hugging Face forms (src/pipelines/export.py): every model that has one
is written to ``<export>/<model>/hf/``, checked, and listed in the manifest."""

import json

import torch

from src.core import load_model
from src.core.checkpoint import file_sha256


def test_export_stage_writes_the_hf_form_of_every_model_that_has_one(tiny_pipeline):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Mamba2ForCausalLM

    export = tiny_pipeline["output_dir"] / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    for name in ("mamba", "rlhf", "transformer"):
        hf = manifest["models"][name]["hf"]
        folder = export / name / "hf"
        assert hf["path"] == f"{name}/hf" and folder.is_dir()
        assert 0.0 <= hf["max_abs_diff"] <= 1e-4
        for file_name, record in hf["files"].items():
            assert file_sha256(folder / file_name) == record["sha256"]
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(hf["files"])
    for name in ("rag", "rl"):
        assert "hf" not in manifest["models"][name] and not (export / name / "hf").exists()

    # the exported LM generates in transformers what MARK generates from the exported checkpoint
    model, tokenizer, _ = load_model("rlhf", export, device="cpu")
    hf_model = Mamba2ForCausalLM.from_pretrained(export / "rlhf" / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(export / "rlhf" / "hf")
    ids = hf_tok("def main():", return_tensors="pt").input_ids
    assert ids[0].tolist() == [tokenizer.bos_id] + tokenizer.encode("def main():")
    with torch.no_grad():
        assert (hf_model(ids, use_cache=False).logits - model(ids).logits).abs().max().item() <= 1e-4

    classifier, _, _ = load_model("transformer", export, device="cpu")
    hf_cls = AutoModelForSequenceClassification.from_pretrained(export / "transformer" / "hf")
    assert hf_cls.config.id2label == dict(enumerate(classifier.label_names))
