"""MARK's Mamba-2 long-document language model.

    from src.mamba import load_mamba, generate
    model, tokenizer = load_mamba("checkpoints/mamba")          # best_model.pt, on CPU
    text = generate(model, tokenizer, "The json module", max_new_tokens=50, temperature=0.8, top_p=0.95, seed=0)

Modules: ``model`` (MambaLM, the SSD blocks), ``ssd`` (the chunked scan and the recurrent
step), ``tokenizer`` (byte-level BPE), ``data`` (packing documents into windows), ``train``
(the training recipe), ``loss`` (fused LM-head cross-entropy), ``generate`` (sampling, log-probs),
``evaluate`` (perplexity, the unigram baseline),
``load`` (checkpoint -> model), ``pretrained`` (a transformers or mamba_ssm Mamba-2 checkpoint
folder -> model + tokenizer, for ``model.pretrained``), ``export`` (model -> HF folder, GGUF file).
"""

from src.mamba.evaluate import perplexity
from src.mamba.generate import generate, generate_ids, token_logprobs
from src.mamba.load import load_mamba
from src.mamba.model import MambaArgs, MambaCache, MambaLM, MambaOutput, to_hf_config
from src.mamba.tokenizer import MambaTokenizer

__all__ = [
    "MambaArgs",
    "MambaCache",
    "MambaLM",
    "MambaOutput",
    "MambaTokenizer",
    "generate",
    "generate_ids",
    "load_mamba",
    "perplexity",
    "to_hf_config",
    "token_logprobs",
]
