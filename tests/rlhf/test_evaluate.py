"""The grounded-answer measures of the RLHF evaluation (src/rlhf/evaluate.py): ROUGE-L on
hand-computed values and the extractive baseline. The full evaluation runs in test_train.py."""

import pytest

from src.data.prompts import Passage
from src.rlhf.evaluate import extractive_answer, lcs_length, rouge_l


def test_lcs_length_on_hand_computed_values():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == 0 and lcs_length(["a", "b"], ["b", "a"]) == 1


@pytest.mark.parametrize("candidate, reference, expected", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS "the cat on the mat": P = R = 5/6
    ("police killed the gunman", "the gunman police killed", 0.5),  # LCS 2 of 4 and 4
    ("a b", "a b c d", 2 / 3),  # P = 1, R = 1/2
    ("Read ROWS.", "read rows", 1.0),  # lower-cased words, punctuation ignored
    ("", "read rows", 0.0),
    ("x y", "read rows", 0.0),
])
def test_rouge_l_on_hand_computed_values(candidate, reference, expected):
    assert rouge_l(candidate, reference) == pytest.approx(expected)


def test_rouge_l_agrees_with_the_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("Return a reader object which iterates over lines.", "Return a reader object."),
             ("Open a file, 2 ways.", "Open the file in 2 different ways, or not")]
    for candidate, reference in pairs:
        assert rouge_l(candidate, reference) == pytest.approx(scorer.score(reference, candidate)["rougeL"].fmeasure)


def test_extractive_answer_is_the_best_sentence_of_the_best_passage():
    passages = [Passage("a", "Unrelated words here. Nothing at all."),
                Passage("csv", "## csv.reader(f) Return a reader object. It iterates over lines in the CSV file.")]
    question = "How do I get a reader object for a CSV file?"
    # Sentence 1 shares "a reader object" (F = 6/18), sentence 2 "csv file" (F = 4/19).
    assert extractive_answer(question, passages) == "## csv.reader(f) Return a reader object."
    assert extractive_answer(question, []) == ""
