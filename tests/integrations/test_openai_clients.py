"""Agent tooling against the real server: langchain-openai's ChatOpenAI and OpenAI pointed
at /v1, and MARK's LangGraph graph generating through the server (src/integrations/graph.py)."""

from __future__ import annotations

import httpx
import openai
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAI

from src.integrations import MARKLangChainGraph

MESSAGES = [
    {"role": "system", "content": "You answer questions about the Python standard library."},
    {"role": "user", "content": "What does json.dumps do?"},
]


def test_chat_openai_speaks_to_the_server_like_the_openai_client(server):
    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model="mamba", temperature=0, max_tokens=16, max_retries=0)
    reply = chat.invoke([SystemMessage(MESSAGES[0]["content"]), HumanMessage(MESSAGES[1]["content"])])
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        direct = client.chat.completions.create(model="mamba", messages=MESSAGES, temperature=0, max_tokens=16)
    assert reply.content == direct.choices[0].message.content
    assert reply.response_metadata["finish_reason"] == direct.choices[0].finish_reason
    assert reply.usage_metadata["output_tokens"] == direct.usage.completion_tokens
    streamed = "".join(chunk.content for chunk in chat.stream([HumanMessage(MESSAGES[1]["content"])]))
    again = chat.invoke([HumanMessage(MESSAGES[1]["content"])])
    assert streamed == again.content
    scored = chat.bind(logprobs=True, top_logprobs=2).invoke([HumanMessage("Open a file")])
    content = scored.response_metadata["logprobs"]["content"]
    assert content and all(len(entry["top_logprobs"]) == 2 for entry in content)


def test_langgraph_graph_over_the_server_answers_as_in_process(server, tiny_checkpoints):
    remote = OpenAI(base_url=f"{server.url}/v1", api_key="unused", model="mamba", temperature=0, max_tokens=12, max_retries=0)
    over_http = MARKLangChainGraph(checkpoints_dir=tiny_checkpoints, top_k=2, device="cpu", llm=remote)
    local = MARKLangChainGraph(checkpoints_dir=tiny_checkpoints, top_k=2, max_new_tokens=12, device="cpu")
    try:
        question = "How do I serialize an object to JSON?"
        remote_answer, local_answer = over_http.query(question), local.query(question)
        assert remote_answer["prompt"] == local_answer["prompt"]
        assert remote_answer["doc_ids"] == local_answer["doc_ids"]
        assert remote_answer["answer"] == local_answer["answer"]  # greedy: the same model, the same text
        first = over_http.chat("What does json.dumps do?", thread_id="t")
        second = over_http.chat("And json.loads?", thread_id="t")
        assert first["answer"] in second["prompt"] and "json.dumps" in second["prompt"]
        assert [t["role"] for t in over_http.get_conversation_history("t")] == ["user", "assistant"] * 2
    finally:
        over_http.close()
        local.close()
    stats = httpx.get(f"{server.url}/models").json()["generation"]["mamba"]
    assert stats["steps"] > 0
