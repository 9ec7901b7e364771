"""The LangChain / LangGraph integration on tiny real models (src/integrations/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.llms import LLM
from langchain_core.retrievers import BaseRetriever

from src.core.errors import DataError, NotTrainedError, UnreadableFileError
from src.integrations import MARKLangChainGraph
from src.mamba import generate, load_mamba


class PromptRecorder(BaseCallbackHandler):
    """Keeps every prompt LangChain sends to an LLM."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def on_llm_start(self, serialized, prompts, **kwargs) -> None:
        self.prompts.extend(prompts)


def indexed_docs(checkpoints: Path) -> list[dict]:
    path = checkpoints.parent / "data" / "documents.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def graph(tiny_checkpoints):
    g = MARKLangChainGraph(llm_model="mamba", checkpoints_dir=tiny_checkpoints, top_k=2, max_new_tokens=12, device="cpu")
    yield g
    g.close()


def test_components_are_langchain_objects_over_marks_models(graph, tiny_checkpoints):
    assert isinstance(graph.retriever, BaseRetriever) and isinstance(graph.llm, LLM)
    doc = indexed_docs(tiny_checkpoints)[2]
    found = graph.retriever.invoke(doc["text"][:200])
    assert len(found) == 2 and found[0].metadata["doc_id"] == doc["id"]
    assert found[0].page_content in doc["text"]

    model, tokenizer = load_mamba(tiny_checkpoints / "mamba", "cpu")
    expected = generate(model, tokenizer, "import", max_new_tokens=12, temperature=0)
    assert graph.llm.invoke("import") == expected
    assert "".join(graph.llm.stream("import")) == expected
    if len(expected) >= 5:  # a stop string ends the text before it
        stop = expected[2:5]
        assert graph.llm.invoke("import", stop=[stop]) == expected[: expected.index(stop)]


def test_query_retrieves_then_generates_from_the_retrieved_text(graph, tiny_checkpoints):
    doc = indexed_docs(tiny_checkpoints)[4]
    question = doc["text"][:150]
    recorder = PromptRecorder()
    result = graph.query(question, config={"callbacks": [recorder]})
    assert result["doc_ids"][0] == doc["id"]
    assert [s["doc_id"] for s in result["sources"]][0] == doc["id"] and len(result["sources"]) == 2
    assert recorder.prompts == [result["prompt"]]
    assert f"[{doc['id']}]" in result["prompt"] and result["prompt"].endswith("Answer:")
    assert " ".join(doc["text"][:60].split()) in result["prompt"]
    assert isinstance(result["answer"], str)
    assert graph.get_conversation_history("default") == []  # query remembers nothing


def test_chat_memory_reaches_the_prompt_per_thread(graph):
    recorder = PromptRecorder()
    config = {"callbacks": [recorder]}
    first = graph.chat("What does json.dumps do?", thread_id="alice", config=config)
    second = graph.chat("And what about json.loads?", thread_id="alice", config=config)
    assert len(recorder.prompts) == 2
    assert "json.dumps" not in recorder.prompts[0].split("Question:")[0]  # nothing remembered yet
    earlier = recorder.prompts[1].split("Question:")[0]
    assert "User: What does json.dumps do?" in earlier
    assert f"Assistant: {first['answer']}" in earlier
    assert second["thread_id"] == "alice"

    history = graph.get_conversation_history("alice")
    assert [t["role"] for t in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "What does json.dumps do?" and history[3]["content"] == second["answer"]

    graph.chat("Tell me about sockets", thread_id="bob", config=config)
    assert "json.dumps" not in recorder.prompts[2]  # another thread, another memory
    assert len(graph.get_conversation_history("bob")) == 2

    graph.clear_memory("alice")
    assert graph.get_conversation_history("alice") == []
    assert len(graph.get_conversation_history("bob")) == 2
    graph.chat("What does json.dumps do?", thread_id="alice", config=config)
    assert "Conversation:" not in recorder.prompts[3]
    graph.clear_memory()
    assert graph.get_conversation_history("bob") == [] and graph.get_conversation_history("alice") == []


def test_added_and_loaded_documents_are_really_indexed(graph, tmp_path, pdf_writer):
    before = len(graph.index.documents)
    doc_id = graph.add_document("Zebras graze on savanna grass and migrate across the Serengeti every year.", metadata={"topic": "zebra"})
    hit = graph.search("zebra migration across the Serengeti", top_k=1)[0]
    assert hit.metadata["doc_id"] == doc_id and hit.metadata["topic"] == "zebra"

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "volcano.txt").write_text("A volcano erupts lava, ash and gas from magma chambers under the crust.")
    (tmp_path / "notes" / "bread.txt").write_text("Knead the dough of flour, water, yeast and salt, let it rise, then bake the bread.")
    (tmp_path / "notes" / "sea").mkdir()
    (tmp_path / "notes" / "sea" / "coral.md").write_text("# Reefs\n\n## Coral\n\nCoral polyps build reefs of limestone in warm shallow seas.\n")
    # Recursively, any mix of formats; ids are paths relative to the folder given.
    assert sorted(graph.load_documents(tmp_path / "notes")) == ["bread.txt", "sea/coral.md", "volcano.txt"]
    assert graph.search("how to bake bread with yeast", top_k=1)[0].metadata["doc_id"] == "bread.txt"
    coral = [graph.index.get_chunk(i) for i in graph.index.doc_chunk_ids("sea/coral.md")]
    assert [c["heading_path"] for c in coral] == [["Reefs", "Coral"]]

    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text(json.dumps({"id": "glacier", "text": "Glaciers are slow rivers of ice carving valleys in mountains.", "metadata": {}}) + "\n")
    assert graph.load_documents(jsonl) == ["glacier"]

    pdf = pdf_writer(tmp_path / "lighthouse.pdf", [["The lighthouse keeper trims the lamp wick", "so ships avoid the rocky reef at night."]])
    assert graph.load_documents(pdf) == ["lighthouse.pdf#p1"]
    hit = graph.search("lighthouse lamp keeps ships off the reef", top_k=1)[0]
    assert hit.metadata["doc_id"] == "lighthouse.pdf#p1" and "lighthouse keeper" in hit.page_content
    assert hit.metadata["page"] == 1

    assert len(graph.index.documents) == before + 6
    result = graph.query("Why do ships need the lighthouse lamp at night?")
    assert result["doc_ids"][0] == "lighthouse.pdf#p1" and "lighthouse keeper" in result["prompt"]


def test_bad_documents_and_inputs_are_one_line_errors(graph, tmp_path):
    graph.add_document("The first text of this id.", doc_id="twice")
    with pytest.raises(DataError, match="'twice' is already in the index"):
        graph.add_document("The second text of this id.", doc_id="twice")
    with pytest.raises(DataError, match="no such file"):
        graph.load_documents(tmp_path / "missing.txt")
    (tmp_path / "slides.key").write_bytes(b"keynote")
    with pytest.raises(UnreadableFileError, match="slides.key: unsupported file type '.key'"):
        graph.load_documents(tmp_path / "slides.key")
    (tmp_path / "broken.pdf").write_bytes(b"not a pdf at all")
    with pytest.raises(UnreadableFileError, match="broken.pdf: not a readable PDF"):
        graph.load_documents(tmp_path / "broken.pdf")
    with pytest.raises(DataError, match="question"):
        graph.query("   ")


def test_missing_models_name_the_training_command(tmp_path):
    with pytest.raises(NotTrainedError, match="orchestrator train --target=rag"):
        MARKLangChainGraph(llm_model="mamba", checkpoints_dir=tmp_path)
