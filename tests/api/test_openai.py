"""The OpenAI-compatible endpoints through the official ``openai`` client against the real server."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

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
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="mamba", prompt="x", logprobs=2)
    with pytest.raises(openai.InternalServerError, match="orchestrator train --target=rlhf"):
        client.completions.create(model="rlhf", prompt="x")


def test_wrong_key_is_an_authentication_error(keyed_server):
    with openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="not-the-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=0) as good:
        assert good.models.list().data == []
