"""src/data/rag_hard.py: the harder sample questions reword their source and share few words with the answer."""

from __future__ import annotations

import json
from pathlib import Path

from src.data.rag_hard import MAX_SHARED_WORDS, build_hard_rag_eval, content_words, paraphrase


def test_paraphrase_replaces_words_and_keeps_case():
    assert paraphrase("Return the file path.") == "Hand over the disk record route on disk."


def test_hard_set_shares_few_words_with_the_answer(sample_data_dir: Path):
    docs = [json.loads(line) for line in (sample_data_dir / "documents.jsonl").read_text().splitlines() if line.strip()]
    easy = [json.loads(line) for line in (sample_data_dir / "rag_eval.jsonl").read_text().splitlines() if line.strip()]
    hard = [json.loads(line) for line in (sample_data_dir / "rag_eval_hard.jsonl").read_text().splitlines() if line.strip()]
    assert hard == build_hard_rag_eval(easy, docs)  # what prepare wrote, deterministically
    assert len(hard) >= 100
    text = {d["id"]: d["text"] for d in docs}
    sources = {ex["source"]: ex["query"] for ex in easy}
    for ex in hard:
        shared = content_words(ex["query"]) & content_words(text[ex["relevant_docs"][0]])
        assert len(shared) <= MAX_SHARED_WORDS and ex["query"] != sources[ex["source"]]
