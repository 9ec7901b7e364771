"""Ratings as DPO preference pairs: MARK's {prompt, chosen, rejected} format, appended atomically."""

import json
import threading
from pathlib import Path

import pytest

from src.board.preferences import count_pairs, ratings_file_for, record_comparison, record_rating
from src.core.errors import DataError
from src.data.readers import read_preferences

PROMPT = "Context:\n[doc-1] Mamba is a state space model.\n\nQuestion: What is Mamba?\nAnswer:"


def test_a_comparison_is_one_pair_the_dpo_reader_reads(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    record_comparison(path, PROMPT, " A state space model. ", "A cat.")
    pairs = read_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(PROMPT, "A state space model.", "A cat.")]
    assert set(json.loads(path.read_text().splitlines()[0])) == {"prompt", "chosen", "rejected"}
    with pytest.raises(DataError, match="same text"):
        record_comparison(path, PROMPT, "same", " same")
    with pytest.raises(DataError, match="empty"):
        record_comparison(path, PROMPT, "", "x")
    assert count_pairs(path) == 1


def test_up_and_down_ratings_of_one_prompt_make_pairs(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    assert record_rating(path, PROMPT, "A state space model.", up=True, model="rlhf") == []
    assert not path.exists()  # one rating is no pair yet
    made = record_rating(path, PROMPT, "A kind of snake.", up=False, model="rlhf")
    assert made == [{"prompt": PROMPT, "chosen": "A state space model.", "rejected": "A kind of snake."}]
    made = record_rating(path, PROMPT, "No idea.", up=False)
    assert made == [{"prompt": PROMPT, "chosen": "A state space model.", "rejected": "No idea."}]
    assert record_rating(path, "Question: other?\nAnswer:", "Yes.", up=False) == []
    assert count_pairs(path) == 2
    ratings = [json.loads(line) for line in ratings_file_for(path).read_text().splitlines()]
    assert [r["rating"] for r in ratings] == [1, -1, -1, -1] and ratings[0]["model"] == "rlhf"


def test_concurrent_appends_keep_every_line_whole(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}')  # a last line without its newline

    def rate(worker: int) -> None:
        for i in range(25):
            record_comparison(path, f"Question: q{worker}-{i}?\nAnswer:", "x" * 500 + str(i), "y" * 500)

    threads = [threading.Thread(target=rate, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pairs = read_preferences(path)
    assert len(pairs) == 101
    assert {p.prompt for p in pairs[1:]} == {f"Question: q{w}-{i}?\nAnswer:" for w in range(4) for i in range(25)}
