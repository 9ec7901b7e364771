"""Chat on the tiny models through the API's model service: streamed answers with evidence and
sources, history in the prompt, two sampled answers, and ratings written as DPO pairs."""

import asyncio

import pytest

from src.api.generation import GenerationParams
from src.board.chat import ALIGNED_PREFIX, answer, sample_pair, stream_answer
from src.board.preferences import record_comparison, record_rating
from src.core.errors import MarkError, NotTrainedError
from src.data.prompts import is_grounded_prompt
from src.data.readers import read_preferences

PARAMS = GenerationParams(max_new_tokens=12, temperature=0.8, seed=3)


async def _collect(models, question, **kwargs):
    return [u async for u in stream_answer(models, question, **kwargs)]


def test_streamed_answer_with_evidence_history_and_ratings(workspace) -> None:
    models = workspace.models
    updates = asyncio.run(_collect(models, "What does a thread pool executor do?", model="mamba", rag=True, top_k=3,
                                   mode="hybrid", params=PARAMS))
    first, last = updates[0], updates[-1]
    assert first.text == "" and len(first.sources) == 3 and first.evidence  # evidence before any token
    assert all(e["doc_id"] in {s["doc_id"] for s in first.sources} for e in first.evidence)
    assert len(updates) >= 3 and last.done and last.finish_reason in ("stop", "length")
    assert is_grounded_prompt(last.prompt) and last.prompt.startswith("Context:\n[")
    # Streaming: the text grows piece by piece (the last update is cut at the stop strings).
    assert [len(u.text) for u in updates[1:-1]] == sorted(len(u.text) for u in updates[1:-1])

    # The same seed gives the same answer; history goes into the prompt; RAG off has no context.
    again = asyncio.run(answer(models, "What does a thread pool executor do?", model="mamba", top_k=3, mode="hybrid", params=PARAMS))
    assert again.text == last.text
    follow = asyncio.run(answer(models, "And a future?", history=[("user", "What is an executor?"), ("assistant", "It runs calls.")],
                                model="mamba", rag=False, params=PARAMS))
    assert follow.prompt == "Conversation:\nUser: What is an executor?\nAssistant: It runs calls.\n\nQuestion: And a future?\nAnswer:"
    assert follow.evidence == [] and follow.sources == []

    # Two sampled answers, one picked; a thumbs up and down on two answers of one prompt.
    prompt, a, b = asyncio.run(sample_pair(models, "What does a thread pool executor do?", model="mamba", top_k=3, mode="hybrid",
                                           params=PARAMS))
    assert prompt == last.prompt and a != b
    prefs = workspace.preferences_file
    record_comparison(prefs, prompt, a, b)
    record_rating(prefs, last.prompt, last.text or "(empty)", up=True, model="mamba")
    record_rating(prefs, prompt, b, up=False, model="mamba")
    pairs = read_preferences(prefs)  # the DPO stage's reader
    assert [(p.chosen, p.rejected) for p in pairs] == [(a.strip(), b.strip()), ((last.text or "(empty)").strip(), b.strip())]


def test_models_that_are_not_there_fail_with_one_line(workspace) -> None:
    assert workspace.models.choices() == ["mamba", "rlhf"]
    with pytest.raises(NotTrainedError, match="rlhf"):
        asyncio.run(answer(workspace.models, "hello?", model="rlhf", params=PARAMS))
    with pytest.raises(MarkError, match="no rlhf_final_model.pt"):
        workspace.models.worker(f"{ALIGNED_PREFIX}../mamba")
    with pytest.raises(MarkError, match="ask a question"):
        asyncio.run(answer(workspace.models, "  ", model="mamba", params=PARAMS))
    with pytest.raises(MarkError, match="temperature above 0"):
        asyncio.run(sample_pair(workspace.models, "hi?", model="mamba", params=GenerationParams(temperature=0.0)))
