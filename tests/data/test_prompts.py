"""The grounded / chat prompt layout shared by the server, the LangChain graph and the RLHF data
(src/data/prompts.py)."""

import pytest

from src.data.prompts import (
    ANSWER_STOP,
    Passage,
    chat_prompt,
    cut_at_stop,
    grounded_prompt,
    is_grounded_prompt,
    parse_grounded_prompt,
    select_passages,
)


def test_grounded_prompt_layout_and_its_inverse():
    passages = select_passages([Passage("csv", "## csv.reader(f)\n\nReturn a   reader."), Passage("json", "Encode JSON.")])
    prompt = grounded_prompt(" How do I read a CSV file? ", passages)
    assert prompt == ("Context:\n[csv] ## csv.reader(f) Return a reader.\n[json] Encode JSON.\n\n"
                      "Question: How do I read a CSV file?\nAnswer:")
    assert is_grounded_prompt(prompt) and parse_grounded_prompt(prompt) == ("How do I read a CSV file?", passages)
    assert is_grounded_prompt(grounded_prompt("Why?", [])) and parse_grounded_prompt(grounded_prompt("Why?", [])) == ("Why?", [])
    for plain in ("What does json.dumps do?", "What is x?\n", chat_prompt([("user", "Question: hi")])):
        assert not is_grounded_prompt(plain)
        with pytest.raises(ValueError):
            parse_grounded_prompt(plain)


def test_select_passages_cuts_long_passages_at_a_word_and_stops_at_the_budget():
    # "a": 120 words (599 chars) + " ..." = 603; "b": 19 chars (622 in all); "c" would make 623.
    chosen = select_passages([Passage("a", "word " * 200), Passage("b", "x " * 10), Passage("c", "y")], max_chars=622)
    assert [p.doc_id for p in chosen] == ["a", "b"] and chosen[0].text.endswith("word ...") and len(chosen[0].text) == 603


def test_cut_at_stop_returns_what_the_server_answers():
    assert cut_at_stop(" It reads rows.\nQuestion: next?", ANSWER_STOP) == "It reads rows."
    assert cut_at_stop("First line.\n\nSecond.") == "First line."
    assert cut_at_stop("\n\nlater") == "" and cut_at_stop("  plain  ") == "plain"
