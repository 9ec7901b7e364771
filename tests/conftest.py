"""Shared test setup: offline Hugging Face hub, and MARK's sample corpus built once per session."""

import os

# Tests never touch the network: the hub resolves local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from src.data.prepare import prepare_sample_data  # noqa: E402


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the full sample corpus of ``src.data.prepare`` (about 1 s to build).

    It has documents.jsonl, lm_{train,val}.jsonl, classification_{train,val,test}.jsonl,
    labels.json, rag_eval.jsonl, sft_{train,val,test}.jsonl, preferences_{train,val,test}.jsonl and
    manifest.json. It is shared by the whole session: read it, don't modify it (copy it
    to ``tmp_path`` first when a test needs to change files).
    """
    output_dir = tmp_path_factory.mktemp("data")
    prepare_sample_data(output_dir)
    return output_dir
