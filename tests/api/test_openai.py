"""The OpenAI-compatible endpoints through the official ``openai`` client against the real server."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch

from src.mamba import generate_ids, load_mamba
from src.rag.load import load_rag_index
from tests.api.fixtures import API_KEY


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_models_lists_the_trained_language_models_and_the_embedder(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"mamba", "minilm"}  # rlhf is not trained in this folder


def test_completion_matches_marks_own_generate(client, server):
    mark = httpx.post(f"{server.url}/generate", json={"prompt": "import", "max_new_tokens": 12, "temperature": 0}).json()
    completion = client.completions.create(model="mamba", prompt="import", max_tokens=12, temperature=0)
    assert completion.object == "text_completion" and completion.model == "mamba"
    assert completion.choices[0].text == mark["text"]
    assert completion.choices[0].finish_reason == mark["finish_reason"]
    assert completion.usage.prompt_tokens == mark["prompt_tokens"]
    assert completion.usage.completion_tokens == mark["completion_tokens"]
    assert completion.usage.total_tokens == mark["prompt_tokens"] + mark["completion_tokens"]


def test_completion_of_several_prompts_and_choices(client):
    completion = client.completions.create(model="mamba", prompt=["import", "class"], max_tokens=6, n=2, temperature=1.0, seed=3)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert all(1 <= len(c.text) for c in completion.choices)


def test_completion_streaming(client):
    whole = client.completions.create(model="mamba", prompt="Return the", max_tokens=16, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="mamba", prompt="Return the", max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_completion_and_its_stream_agree(client):
    messages = [
        {"role": "system", "content": "You answer questions about the Python standard library."},
        {"role": "user", "content": "What does json.dumps do?"},
    ]
    chat = client.chat.completions.create(model="mamba", messages=messages, max_tokens=16, temperature=0)
    assert chat.object == "chat.completion"
    message = chat.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 10

    stream = client.chat.completions.create(
        model="mamba", messages=messages, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [chat.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_embeddings_are_the_rag_encoders_vectors(client, tiny_checkpoints):
    texts = ["How do I parse JSON?", "Open a TCP socket"]
    as_base64 = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 by default
    as_float = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert as_base64.usage.prompt_tokens > 4
    vectors = np.array([d.embedding for d in as_base64.data])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(vectors, np.array([d.embedding for d in as_float.data]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    expected = load_rag_index(tiny_checkpoints / "rag", device="cpu").embed_queries(texts)
    np.testing.assert_allclose(vectors, expected, atol=1e-4)
    single = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, expected[0], atol=1e-4)


def test_client_errors_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="mamba", messages=[{"role": "user", "content": "hi"}], max_tokens=100_000)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="mamba", prompt="x", logprobs=6)  # OpenAI's limit is 5
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="mamba", prompt=[[1, 2, 100_000]])
    with pytest.raises(openai.InternalServerError, match="orchestrator train --target=rlhf"):
        client.completions.create(model="rlhf", prompt="x")


def test_wrong_key_is_an_authentication_error(keyed_server):
    with openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="not-the-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=0) as good:
        assert good.models.list().data == []


# ------------------------------------------------------------------------------ logprobs, echo, stop, n
@pytest.fixture(scope="module")
def tiny_lm(tiny_checkpoints):
    return load_mamba(tiny_checkpoints / "mamba", "cpu")


def in_process_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, computed in this process."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_logprobs_are_the_models_own(client, tiny_lm):
    model, tokenizer = tiny_lm
    prompt = "import json\nimport os"
    completion = client.completions.create(model="mamba", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = completion.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    lp = choice.logprobs
    ids = tokenizer.encode(prompt)
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == len(ids)
    # The prompt is read after <|bos|>, so even its first token has a logprob.
    expected = in_process_logprobs(model, [tokenizer.bos_id] + ids)
    np.testing.assert_allclose(lp.token_logprobs, expected.numpy(), atol=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) >= value - 1e-6
    assert completion.usage.completion_tokens == 0 and completion.usage.prompt_tokens == len(ids) + 1

    # Token ids that start with <|bos|>: echoed as given, the first one has nothing before it (null).
    raw = httpx.post(
        f"{client.base_url}completions",
        json={"model": "mamba", "prompt": [tokenizer.bos_id] + ids, "max_tokens": 0, "echo": True, "logprobs": 1},
    ).json()["choices"][0]["logprobs"]
    assert raw["token_logprobs"][0] is None and raw["top_logprobs"][0] is None
    np.testing.assert_allclose(raw["token_logprobs"][1:], expected.numpy(), atol=1e-4)


def test_generated_logprobs_of_greedy_text_are_the_top_ones(client, tiny_lm):
    model, tokenizer = tiny_lm
    completion = client.completions.create(model="mamba", prompt="def read(", max_tokens=8, temperature=0, logprobs=2, echo=True)
    lp = completion.choices[0].logprobs
    prompt_len = len(tokenizer.encode("def read("))
    generated = lp.token_logprobs[prompt_len:]
    ended = completion.choices[0].finish_reason == "stop"  # then the end-of-text token is listed last
    assert len(generated) == completion.usage.completion_tokens + ended
    for value, top in zip(generated, lp.top_logprobs[prompt_len:]):
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the chosen token is the likeliest
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode("def read(")
    new_ids = generate_ids(model, [prompt_ids], 8, temperature=0, eos_id=tokenizer.eos_id)[0]
    new_ids = new_ids[: len(generated)]
    expected = in_process_logprobs(model, prompt_ids + new_ids).numpy()[prompt_len:]
    np.testing.assert_allclose(generated, expected, atol=1e-4)


def test_stop_strings_are_never_in_the_text(client):
    full = client.completions.create(model="mamba", prompt="The json module", max_tokens=30, temperature=0).choices[0].text
    stops = [full[5:7], full[12:13]] if len(full) > 13 else [full[-2:]]
    cut = client.completions.create(model="mamba", prompt="The json module", max_tokens=30, temperature=0, stop=stops)
    first = min(full.index(s) for s in stops)
    assert cut.choices[0].text == full[:first] and cut.choices[0].finish_reason == "stop"
    assert not any(s in cut.choices[0].text for s in stops)


def test_n_choices_and_usage_streamed_and_not(client):
    kwargs = dict(model="mamba", prompt="import", max_tokens=10, temperature=1.0, seed=7, n=3)
    whole = client.completions.create(**kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.text for c in whole.choices}) > 1  # one seed, n different samples
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)}
    assert texts == {i: whole.choices[i].text for i in range(3)}  # same seeds, same samples, streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_chat_logprobs_top_logprobs_stop_and_n(client):
    messages = [{"role": "user", "content": "What does json.dumps do?"}]
    chat = client.chat.completions.create(model="mamba", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content  # greedy
    content = chat.choices[0].logprobs.content
    assert len(content) - (chat.choices[0].finish_reason == "stop") <= chat.usage.completion_tokens // 2
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    text = chat.choices[0].message.content
    if len(text) > 4:
        stop = text[3:5]
        cut = client.chat.completions.create(model="mamba", messages=messages, max_tokens=12, temperature=0, stop=[stop])
        assert stop not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    plain = client.chat.completions.create(model="mamba", messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_stream_carries_logprobs(client):
    messages = [{"role": "user", "content": "Open a file"}]
    whole = client.chat.completions.create(model="mamba", messages=messages, max_tokens=10, temperature=0, logprobs=True)
    chunks = list(client.chat.completions.create(model="mamba", messages=messages, max_tokens=10, temperature=0, logprobs=True, stream=True))
    streamed = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    np.testing.assert_allclose(streamed, [e.logprob for e in whole.choices[0].logprobs.content], atol=1e-6)
